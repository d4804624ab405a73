"""ASHA with promotion and PBT: the decisions, over plain recorded facts."""

from __future__ import annotations

import random

import pytest
from pydantic import TypeAdapter, ValidationError

from workers.schedulers import (
    Asha,
    AshaConfig,
    EpochDecision,
    Exploit,
    Keep,
    Member,
    NewTrial,
    Pbt,
    PbtConfig,
    Promote,
    Range,
    SchedulerConfig,
    TrialFacts,
    schedules,
)

CONFIG = TypeAdapter(SchedulerConfig)


def asha(maximize: bool = True, **kw: int) -> Asha:
    return Asha(AshaConfig(name="asha", **{"min_epochs": 1, "reduction_factor": 3, "max_epochs": 27, **kw}),
                maximize=maximize)


def paused(number: int, **values: float) -> TrialFacts:
    """A trial paused at its highest rung; keyword e1=0.5 is its value at epoch 1."""
    rung_values = {int(k[1:]): v for k, v in values.items()}
    return TrialFacts(number, rung_values, paused_at=max(rung_values))


def test_rungs_are_geometric_below_max_epochs() -> None:
    assert asha().rungs == (1, 3, 9)
    assert asha(min_epochs=2, reduction_factor=2, max_epochs=20).rungs == (2, 4, 8, 16)


def test_on_epoch_pauses_at_rungs_and_finishes_at_max() -> None:
    scheduler = asha()
    assert [scheduler.on_epoch(e) for e in (1, 2, 3, 9, 26, 27)] == [
        EpochDecision.PAUSE, EpochDecision.CONTINUE, EpochDecision.PAUSE, EpochDecision.PAUSE,
        EpochDecision.CONTINUE, EpochDecision.FINISH]


def test_new_trial_until_a_rung_has_eta_entries() -> None:
    scheduler = asha()
    assert scheduler.next_job([]) == NewTrial(1)
    assert scheduler.next_job([paused(0, e1=0.9), paused(1, e1=0.8)]) == NewTrial(1)


def test_promotes_only_the_top_third_of_a_rung() -> None:
    trials = [paused(0, e1=0.5), paused(1, e1=0.9), paused(2, e1=0.7)]
    assert asha().next_job(trials) == Promote(1, 1, 3)
    # minimizing, the same values rank the other way round
    assert asha(maximize=False).next_job(trials) == Promote(0, 1, 3)


def test_a_promoted_trial_is_never_promoted_twice() -> None:
    scheduler = asha()
    # trial 1 was promoted from rung 1 and is training towards rung 3: rung 1's top third is used up
    trials = [paused(0, e1=0.5), TrialFacts(1, {1: 0.9}), paused(2, e1=0.7)]
    assert scheduler.next_job(trials) == NewTrial(1)
    # with six entries the top third is two: the second best is promoted, never the first again
    trials += [paused(3, e1=0.1), paused(4, e1=0.2), paused(5, e1=0.3)]
    assert scheduler.next_job(trials) == Promote(2, 1, 3)


def test_higher_rungs_are_promoted_first() -> None:
    trials = [paused(n, e1=0.1 * n) for n in range(6)]
    trials[5] = TrialFacts(5, {1: 0.5, 3: 0.6}, paused_at=3)
    trials[4] = TrialFacts(4, {1: 0.4, 3: 0.7}, paused_at=3)
    trials.append(TrialFacts(6, {1: 0.9, 3: 0.2}, paused_at=3))
    # rung 3 has three entries: the best (trial 4) goes to 9 before rung 1's paused trials are looked at
    assert asha().next_job(trials) == Promote(4, 3, 9)


def test_the_last_rung_promotes_to_max_epochs() -> None:
    trials = [TrialFacts(n, {1: 1.0, 3: 1.0, 9: 0.1 * n}, paused_at=9) for n in range(3)]
    assert asha().next_job(trials) == Promote(2, 9, 27)


def test_ties_go_to_the_older_trial_and_non_finite_values_rank_last() -> None:
    trials = [paused(0, e1=float("nan")), paused(1, e1=0.5), paused(2, e1=0.5)]
    assert asha().next_job(trials) == Promote(1, 1, 3)
    assert asha(maximize=False).next_job(trials) == Promote(1, 1, 3)


def test_at_study_end_paused_trials_end_with_their_last_value() -> None:
    trials = [paused(0, e1=0.5), TrialFacts(1, {1: 0.9, 3: 0.95}), TrialFacts(2, {1: 0.8, 3: 0.6}, paused_at=3)]
    assert asha().at_study_end(trials) == {0: 0.5, 2: 0.6}


def test_paused_elsewhere_than_the_highest_rung_is_refused() -> None:
    with pytest.raises(ValueError, match="highest rung"):
        TrialFacts(0, {1: 0.5, 3: 0.6}, paused_at=1)


@pytest.mark.parametrize(("spec", "message"), [
    ({"name": "asha", "min_epochs": 5, "max_epochs": 5}, "must be below max_epochs"),
    ({"name": "asha", "reduction_factor": 1, "max_epochs": 9}, "greater than or equal to 2"),
    ({"name": "asha", "min_epochs": 0, "max_epochs": 9}, "greater than or equal to 1"),
    ({"name": "pbt", "population": 1, "interval_epochs": 2}, "greater than or equal to 2"),
    ({"name": "pbt", "population": 4, "interval_epochs": 2, "mutable": ["units"]}, "units cannot change"),
    ({"name": "pbt", "population": 4, "interval_epochs": 2, "mutable": ["dropout", "dropout"]}, "twice"),
    ({"name": "pbt", "population": 4, "interval_epochs": 2, "perturb": [1.2, 0.8]}, "0 < low < high"),
    ({"name": "pbt", "population": 4, "interval_epochs": 2, "quantile": 0.75}, "less than or equal to 0.5"),
    ({"name": "hyperband"}, "does not match any of the expected tags"),
])
def test_invalid_configs_say_why(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CONFIG.validate_python(spec)


RANGES = {"learning_rate": Range(1e-4, 1e-1, log=True), "dropout": Range(0.0, 0.5),
          "momentum": Range(0.5, 0.99), "weight_decay": Range(1e-8, 1e-2, log=True)}


def pbt(**kw: object) -> Pbt:
    config = PbtConfig(**{"name": "pbt", "population": 8, "interval_epochs": 2,
                          "mutable": ["learning_rate", "dropout"], **kw})
    return Pbt(config, RANGES, maximize=True)


def population(epoch: int = 2) -> list[Member]:
    return [Member(n, epoch, 0.1 * n, {"learning_rate": 0.01 * (n + 1), "dropout": 0.1, "units": 64})
            for n in range(8)]


def test_only_the_bottom_quantile_exploits_and_only_when_due() -> None:
    scheduler, members = pbt(), population()
    decisions = {m.number: scheduler.on_epoch(m, members, random.Random(0)) for m in members}
    # ceil(8 * 0.25) = 2: members 0 and 1 (the worst) copy one of the top two (6, 7)
    assert {n for n, d in decisions.items() if isinstance(d, Exploit)} == {0, 1}
    assert all(d.source in (6, 7) and d.source_epoch == 2 for d in decisions.values() if isinstance(d, Exploit))
    early = population(epoch=1)
    assert scheduler.on_epoch(early[0], early, random.Random(0)) == Keep()
    changed = Member(0, 3, 0.0, early[0].params, changed_at=2)
    assert scheduler.on_epoch(changed, population(epoch=3), random.Random(0)) == Keep()


def test_exploit_copies_the_source_values_and_explores_the_mutable_ones() -> None:
    members = population()
    decision = pbt(resample_probability=0.0).on_epoch(members[0], members, random.Random(3))
    assert isinstance(decision, Exploit)
    source = members[decision.source].params
    assert decision.params["units"] == 64  # not mutable: copied as it is
    for name in ("learning_rate", "dropout"):
        assert decision.params[name] / source[name] in (pytest.approx(0.8), pytest.approx(1.2))


def test_resampled_values_stay_in_range() -> None:
    members = population()
    for seed in range(20):
        decision = pbt(resample_probability=1.0).on_epoch(members[0], members, random.Random(seed))
        assert isinstance(decision, Exploit)
        assert 1e-4 <= decision.params["learning_rate"] <= 1e-1 and 0 <= decision.params["dropout"] <= 0.5


def test_perturbed_values_are_clipped_to_the_range() -> None:
    members = [Member(n, 2, 0.1 * n, {"learning_rate": 0.1, "dropout": 0.5}) for n in range(4)]
    for seed in range(10):
        decision = pbt(resample_probability=0.0).on_epoch(members[0], members, random.Random(seed))
        assert isinstance(decision, Exploit)
        assert decision.params["learning_rate"] <= 0.1 and decision.params["dropout"] <= 0.5


def test_the_same_seed_replays_the_same_schedule() -> None:
    def schedule(seed: int) -> list[Exploit | Keep]:
        rng, members = random.Random(seed), population()
        return [pbt().on_epoch(m, members, rng) for m in members]

    assert schedule(7) == schedule(7)
    assert any(schedule(7)[n] != schedule(8)[n] for n in (0, 1))


def test_a_member_without_its_range_is_refused() -> None:
    config = PbtConfig(name="pbt", population=4, interval_epochs=1, mutable=["momentum"])
    with pytest.raises(ValueError, match="momentum"):
        Pbt(config, {"learning_rate": RANGES["learning_rate"]}, maximize=True)


def test_members_that_have_not_reported_are_not_ranked() -> None:
    members = population()[:2] + [Member(n, 0, 0.0, {"learning_rate": 0.01}) for n in range(2, 8)]
    # two reporting members: one is the bottom, one the top
    decision = pbt().on_epoch(members[0], members, random.Random(0))
    assert isinstance(decision, Exploit) and decision.source == 1


def test_lineage_replays_each_members_schedule_through_copied_checkpoints() -> None:
    starts = {0: {"learning_rate": 0.1}, 1: {"learning_rate": 0.01}, 2: {"learning_rate": 0.001}}
    steps = [
        Exploit(member=2, epoch=4, source=1, source_epoch=4, params={"learning_rate": 0.012}),
        Exploit(member=0, epoch=8, source=2, source_epoch=6, params={"learning_rate": 0.0096}),
    ]
    result = schedules(starts, steps)
    assert result[1] == [(0, {"learning_rate": 0.01})]
    assert result[2] == [(0, {"learning_rate": 0.01}), (4, {"learning_rate": 0.012})]
    # member 0's weights are member 2's of epoch 6, which were member 1's up to epoch 4
    assert result[0] == [(0, {"learning_rate": 0.01}), (4, {"learning_rate": 0.012}), (6, {"learning_rate": 0.0096})]
