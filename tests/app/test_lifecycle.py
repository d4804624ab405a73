"""The study's lifecycle rules, with plain values and no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app import lifecycle
from app.lifecycle import Action, BadTransition, Budget, Counts, Fate, NextTrial, OptunaTell, TrialFacts, Verdict
from app.models import FailureKind, StudyStatus, TrialState
from app.schemas.study import StopSpec

NOW = datetime(2026, 1, 1, tzinfo=UTC)
S = StudyStatus


# ---- status ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status,action,started,target", [
    (S.QUEUED, Action.PAUSE, False, S.PAUSED),
    (S.RUNNING, Action.PAUSE, True, S.PAUSED),
    (S.PAUSED, Action.RESUME, True, S.RUNNING),
    (S.PAUSED, Action.RESUME, False, S.QUEUED),  # paused before any trial started
    (S.QUEUED, Action.CANCEL, False, S.CANCELLED),
    (S.RUNNING, Action.CANCEL, True, S.CANCELLED),
    (S.PAUSED, Action.CANCEL, True, S.CANCELLED),
])
def test_client_actions_lead_where_the_status_diagram_says(status: StudyStatus, action: Action, started: bool,
                                                            target: StudyStatus) -> None:
    assert lifecycle.after_action(status, action, started=started) is target


@pytest.mark.parametrize("status,action", [
    (S.PAUSED, Action.PAUSE), (S.QUEUED, Action.RESUME), (S.RUNNING, Action.RESUME),
    *[(end, action) for end in (S.COMPLETED, S.CANCELLED, S.FAILED) for action in Action],
])
def test_an_action_the_status_does_not_allow_is_refused(status: StudyStatus, action: Action) -> None:
    with pytest.raises(BadTransition, match=f"cannot {action} a {status} study"):
        lifecycle.after_action(status, action, started=True)


def test_a_claim_starts_a_queued_study_and_closing_ends_it() -> None:
    assert lifecycle.after_claim(S.QUEUED) is S.RUNNING
    assert lifecycle.after_claim(S.RUNNING) is S.RUNNING
    assert lifecycle.after_closing(None) is S.COMPLETED
    assert lifecycle.after_closing("no trial completed") is S.FAILED
    assert [s for s in StudyStatus if lifecycle.may_fail(s)] == [S.QUEUED, S.RUNNING, S.PAUSED]


# ---- the budget --------------------------------------------------------------------------------------------


def test_the_budget_is_spent_by_a_stop_then_n_trials_then_the_timeout() -> None:
    budget = Budget(n_trials=3, max_parallel=2, deadline_at=NOW + timedelta(seconds=10))
    assert lifecycle.budget_spent(budget, Counts(0, 1, 2), NOW) is None
    assert lifecycle.budget_spent(budget, Counts(0, 0, 3), NOW) == "n_trials"
    assert lifecycle.budget_spent(budget, Counts(0, 1, 0), NOW + timedelta(seconds=10)) == "timeout"
    stopped = Budget(3, 2, None, stop_requested_at=NOW, stop_reason="target_value")
    assert lifecycle.budget_spent(stopped, Counts(0, 0, 0), NOW) == "target_value"
    assert lifecycle.budget_spent(Budget(3, 2, None, stop_requested_at=NOW), Counts(0, 0, 0), NOW) == "stopped"


def test_a_claim_takes_a_waiting_trial_first_within_max_parallel_and_n_trials() -> None:
    budget = Budget(n_trials=4, max_parallel=2)
    assert lifecycle.next_trial(budget, Counts(waiting=1, running=1, finished=2), NOW) is NextTrial.WAITING
    assert lifecycle.next_trial(budget, Counts(0, 1, 2), NOW) is NextTrial.NEW_SLOT
    assert lifecycle.next_trial(budget, Counts(1, 2, 0), NOW) is None  # max_parallel running
    assert lifecycle.next_trial(budget, Counts(0, 1, 3), NOW) is None  # every slot of n_trials taken
    assert lifecycle.next_trial(Budget(4, 2, NOW), Counts(1, 0, 0), NOW) is None  # timed out


def test_an_extension_runs_first_whatever_the_budget_but_within_max_parallel() -> None:
    spent = Budget(2, 1, deadline_at=NOW, stop_requested_at=NOW)
    assert lifecycle.next_trial(spent, Counts(0, 0, 1, extensions=1), NOW) is NextTrial.EXTENSION
    assert lifecycle.next_trial(spent, Counts(0, 1, 1, extensions=1), NOW) is None  # max_parallel running
    room = Budget(n_trials=3, max_parallel=2)
    assert lifecycle.next_trial(room, Counts(1, 0, 1, extensions=1), NOW) is NextTrial.EXTENSION
    # It holds its place in n_trials while it waits: no new slot for it.
    assert lifecycle.next_trial(room, Counts(0, 1, 1, extensions=1), NOW) is NextTrial.EXTENSION
    assert lifecycle.next_trial(room, Counts(0, 1, 1, paused=0, extensions=0), NOW) is NextTrial.NEW_SLOT
    assert lifecycle.next_trial(Budget(2, 2), Counts(0, 0, 1, extensions=0), NOW) is NextTrial.NEW_SLOT
    assert lifecycle.next_trial(Budget(3, 3), Counts(0, 1, 1, extensions=1), NOW) is NextTrial.EXTENSION


def test_a_promotion_comes_after_waiting_trials_and_before_a_new_one_even_when_every_slot_is_taken() -> None:
    budget = Budget(n_trials=3, max_parallel=2)
    assert lifecycle.next_trial(budget, Counts(0, 0, 1, paused=2, at_rungs=2, promotable=True), NOW) \
        is NextTrial.PROMOTION
    assert lifecycle.next_trial(budget, Counts(1, 0, 0, paused=2, at_rungs=2, promotable=True), NOW) \
        is NextTrial.WAITING
    assert lifecycle.next_trial(budget, Counts(0, 0, 1, paused=2, at_rungs=2), NOW) is None  # all started
    assert lifecycle.next_trial(budget, Counts(0, 2, 0, paused=1, at_rungs=1, promotable=True), NOW) is None


def test_a_scheduled_study_is_exhausted_once_all_started_and_nothing_runs_waits_or_earns_a_promotion() -> None:
    budget = Budget(n_trials=3, max_parallel=2)
    assert lifecycle.schedule_exhausted(budget, Counts(0, 0, 1, paused=2, at_rungs=2))
    assert not lifecycle.schedule_exhausted(budget, Counts(0, 0, 1, paused=2, at_rungs=2, promotable=True))
    assert not lifecycle.schedule_exhausted(budget, Counts(0, 1, 1, paused=1, at_rungs=1))  # one runs
    assert not lifecycle.schedule_exhausted(budget, Counts(0, 0, 1, paused=1, at_rungs=1))  # one to start
    assert not lifecycle.schedule_exhausted(budget, Counts(0, 0, 1, paused=2, at_rungs=1))  # a client's pause


@pytest.mark.parametrize("state,checkpoint,study,why", [
    (TrialState.PRUNED, None, S.RUNNING, "cannot extend a pruned trial: only a complete trial continues"),
    (TrialState.RUNNING, 3, S.RUNNING, "cannot extend a running trial: only a complete trial continues"),
    (TrialState.COMPLETE, None, S.COMPLETED, "cannot extend it: the trial keeps no checkpoint"),
    (TrialState.COMPLETE, 3, S.CANCELLED, "cannot extend a trial of a cancelled study"),
])
def test_only_a_complete_trial_with_a_checkpoint_is_extended(state: TrialState, checkpoint: int | None,
                                                              study: StudyStatus, why: str) -> None:
    with pytest.raises(BadTransition, match=why):
        lifecycle.extension_target(state, checkpoint_epoch=checkpoint, epochs=2, study=study)
    assert lifecycle.extension_target(TrialState.COMPLETE, checkpoint_epoch=3, epochs=2, study=S.COMPLETED) == 5


@pytest.mark.parametrize("status,stopped,cancels,goes_on", [
    (S.RUNNING, False, True, True), (S.PAUSED, False, False, True),  # a pause lets running trials finish
    (S.CANCELLED, False, False, False), (S.FAILED, False, False, False),
    (S.RUNNING, True, False, True), (S.RUNNING, True, True, False),
])
def test_a_running_trial_stops_when_its_study_ended_or_a_stop_cancels_it(status: StudyStatus, stopped: bool,
                                                                        cancels: bool, goes_on: bool) -> None:
    budget = Budget(5, 1, None, stop_requested_at=NOW if stopped else None)
    assert lifecycle.keeps_running(status, budget, NOW, cancels_running=cancels) is goes_on
    past = Budget(5, 1, deadline_at=NOW - timedelta(seconds=1))
    assert lifecycle.keeps_running(S.RUNNING, past, NOW, cancels_running=True) is False


# ---- stop criteria -----------------------------------------------------------------------------------------


def test_the_target_value_fires_on_the_best_complete_trial_in_either_direction() -> None:
    stop = StopSpec(target_value=0.9)
    assert lifecycle.stop_reason([0.5, None, 0.91], maximize=True, stop=stop) == "target_value"
    assert lifecycle.stop_reason([0.5, 0.89], maximize=True, stop=stop) is None
    assert lifecycle.stop_reason([1.2, 0.9], maximize=False, stop=stop) == "target_value"
    assert lifecycle.stop_reason([None, None], maximize=True, stop=stop) is None  # nothing complete yet


def test_no_improvement_counts_pruned_and_failed_trials_and_small_gains_as_no_improvement() -> None:
    stop = StopSpec(no_improvement_trials=3, min_delta=0.01)
    assert lifecycle.stop_reason([0.5, None, 0.505, None], maximize=True, stop=stop) == "no_improvement"
    assert lifecycle.stop_reason([0.5, None, 0.52, None], maximize=True, stop=stop) is None
    assert lifecycle.stop_reason([0.5, 0.6, 0.55, 0.59], maximize=False, stop=stop) == "no_improvement"


# ---- what becomes of a trial -------------------------------------------------------------------------------

SLOT = TrialFacts(configured=False, began=False)  # a sampler's slot before it got a configuration
ENQUEUED = TrialFacts(configured=True, began=False)  # a configuration not yet bound to an Optuna trial
RAN = TrialFacts(configured=True, began=True, attempt=1)


def test_a_failed_attempt_retries_while_attempts_remain_then_fails() -> None:
    kw = {"study_ended": False, "max_attempts": 2, "reason": "worker w1 lost", "failure": FailureKind.LOST}
    assert lifecycle.after_failed_attempt(RAN, **kw) == Verdict(Fate.RETRY, "attempt 1: worker w1 lost",
                                                                FailureKind.LOST)
    assert lifecycle.after_failed_attempt(ENQUEUED, **kw).fate is Fate.RETRY  # its lease must no longer hold
    last = TrialFacts(configured=True, began=True, attempt=2)
    assert lifecycle.after_failed_attempt(last, **kw) == Verdict(
        Fate.FAIL, "worker w1 lost; 2 attempt(s) used", FailureKind.LOST)
    assert lifecycle.after_failed_attempt(SLOT, **kw) == Verdict(Fate.DROP)


def test_a_death_of_a_checkpointed_trial_resumes_it_any_other_failure_starts_over() -> None:
    saved = TrialFacts(configured=True, began=True, attempt=1, checkpointed=True)
    kw = {"study_ended": False, "max_attempts": 2, "reason": "trial process died"}
    for death in (FailureKind.LOST, FailureKind.PROCESS_DIED, FailureKind.DEADLINE):
        assert lifecycle.after_failed_attempt(saved, failure=death, **kw) == Verdict(
            Fate.RESUME, "attempt 1: trial process died; resumed from its checkpoint", death)
    # A hung runner's deadline resumes a checkpointed trial although a deadline retries nothing else.
    assert lifecycle.after_failed_attempt(saved, failure=FailureKind.DEADLINE, retry=False, **kw).fate \
        is Fate.RESUME
    assert lifecycle.after_failed_attempt(saved, failure=FailureKind.WORKER_ERROR, **kw).fate is Fate.RETRY
    assert lifecycle.after_failed_attempt(RAN, failure=FailureKind.PROCESS_DIED, **kw).fate is Fate.RETRY
    last = TrialFacts(configured=True, began=True, attempt=2, checkpointed=True)  # no crash loop
    assert lifecycle.after_failed_attempt(last, failure=FailureKind.LOST, **kw).fate is Fate.FAIL
    assert lifecycle.after_failed_attempt(saved, failure=FailureKind.LOST, study_ended=True, max_attempts=2,
                                          reason="x").fate is Fate.FAIL


def test_a_deadline_fails_at_once_and_an_ended_study_retries_nothing() -> None:
    late = lifecycle.after_failed_attempt(RAN, study_ended=False, max_attempts=3, reason="deadline exceeded",
                                          failure=FailureKind.DEADLINE, retry=False)
    assert late == Verdict(Fate.FAIL, "deadline exceeded", FailureKind.DEADLINE)
    ended = lifecycle.after_failed_attempt(RAN, study_ended=True, max_attempts=3, reason="worker w1 lost",
                                           failure=FailureKind.LOST)
    assert ended == Verdict(Fate.FAIL, "stopped: the study ended (worker w1 lost)", FailureKind.CANCELLED)
    assert lifecycle.after_failed_attempt(ENQUEUED, study_ended=True, max_attempts=3, reason="x",
                                          failure=FailureKind.LOST).fate is Fate.DROP


def test_a_fused_group_failure_sends_each_member_back_whatever_attempts_remain_from_its_checkpoint() -> None:
    kw = {"study_ended": False, "reason": "out_of_memory in a fused group of 2",
          "failure": FailureKind.OUT_OF_MEMORY}
    last = TrialFacts(configured=True, began=True, attempt=3)  # past any max_attempts: not the member's failure
    assert lifecycle.after_group_failure(last, **kw) == Verdict(
        Fate.RETRY, "attempt 3: out_of_memory in a fused group of 2", FailureKind.OUT_OF_MEMORY)
    assert lifecycle.after_group_failure(SLOT, **kw) == Verdict(Fate.DROP)
    checkpointed = TrialFacts(configured=True, began=True, attempt=3, checkpointed=True)
    assert lifecycle.after_group_failure(checkpointed, **kw) == Verdict(
        Fate.RESUME, "attempt 3: out_of_memory in a fused group of 2; resumed from its checkpoint",
        FailureKind.OUT_OF_MEMORY)
    ended = lifecycle.after_group_failure(RAN, study_ended=True, reason="fused trial process died (exit code -9)",
                                          failure=FailureKind.PROCESS_DIED)
    assert ended == Verdict(Fate.FAIL, "stopped: the study ended (fused trial process died (exit code -9))",
                            FailureKind.CANCELLED)


def test_a_hand_back_keeps_the_attempt_unless_the_study_ended() -> None:
    assert lifecycle.after_hand_back(RAN, study_ended=False) == Verdict(Fate.HAND_BACK)
    assert lifecycle.after_hand_back(SLOT, study_ended=False) == Verdict(Fate.DROP)
    assert lifecycle.after_hand_back(RAN, study_ended=True) == Verdict(
        Fate.FAIL, "stopped: the study ended", FailureKind.CANCELLED)


def test_one_rule_ends_waiting_trials_at_every_end_of_a_study() -> None:
    for end in (S.CANCELLED, S.COMPLETED, S.FAILED):
        assert lifecycle.waiting_at_end(ENQUEUED, end) == Verdict(Fate.DROP)  # never began: nothing to keep
        verdict = lifecycle.waiting_at_end(RAN, end)
        assert verdict.fate is Fate.FAIL and verdict.failure is FailureKind.CANCELLED
    assert lifecycle.waiting_at_end(RAN, S.CANCELLED).error == "cancelled before its next attempt"
    assert lifecycle.waiting_at_end(RAN, S.COMPLETED).error == "the study ended before its next attempt"


def test_a_study_that_fails_for_good_fails_its_running_trials_on_the_worker_side() -> None:
    assert lifecycle.running_at_failure(RAN, "no split") == Verdict(Fate.FAIL, "no split", FailureKind.WORKER_ERROR)
    assert lifecycle.running_at_failure(SLOT, "no split") == Verdict(Fate.DROP)


def test_optuna_is_told_to_fail_only_trials_that_exist() -> None:
    assert lifecycle.fail_all([3, None, 5]) == [OptunaTell(3, TrialState.FAIL), OptunaTell(5, TrialState.FAIL)]


# ---- a client's pause and resume of one trial --------------------------------------------------------------

T = TrialState
TA, TC = lifecycle.TrialAction, lifecycle.TrialControl


@pytest.mark.parametrize("state,requested,action,control", [
    (T.WAITING, False, TA.PAUSE, TC.PARK),  # not running: paused at once
    (T.RUNNING, False, TA.PAUSE, TC.REQUEST),  # its worker pauses it at the next boundary
    (T.RUNNING, True, TA.PAUSE, TC.NOTHING),
    (T.PAUSED, False, TA.PAUSE, TC.NOTHING),
    (T.PAUSED, False, TA.RESUME, TC.UNPARK),
    (T.RUNNING, True, TA.RESUME, TC.WITHDRAW),  # a pause not carried out yet is called off
])
def test_pausing_and_resuming_a_trial(state: TrialState, requested: bool, action: lifecycle.TrialAction,
                                      control: lifecycle.TrialControl) -> None:
    assert lifecycle.after_trial_action(state, action, pause_requested=requested, study=S.RUNNING) is control


@pytest.mark.parametrize("state,action,study,why", [
    (T.COMPLETE, TA.PAUSE, S.RUNNING, "cannot pause a complete trial: it has ended"),
    (T.PRUNED, TA.RESUME, S.RUNNING, "cannot resume a pruned trial: it has ended"),
    (T.RUNNING, TA.RESUME, S.RUNNING, "cannot resume a running trial: it is not paused"),
    (T.WAITING, TA.RESUME, S.RUNNING, "cannot resume a waiting trial: it is not paused"),
    (T.PAUSED, TA.RESUME, S.CANCELLED, "cannot resume a trial of a cancelled study"),
])
def test_a_trial_action_its_state_does_not_allow_says_why(state: TrialState, action: lifecycle.TrialAction,
                                                          study: StudyStatus, why: str) -> None:
    with pytest.raises(BadTransition, match=why):
        lifecycle.after_trial_action(state, action, pause_requested=False, study=study)


def test_a_paused_trial_holds_its_place_in_the_budget_but_not_a_slot() -> None:
    budget = Budget(n_trials=3, max_parallel=1)
    assert lifecycle.next_trial(budget, Counts(waiting=0, running=0, finished=2, paused=1), NOW) is None
    assert lifecycle.next_trial(budget, Counts(waiting=0, running=0, finished=1, paused=1), NOW) \
        is NextTrial.NEW_SLOT


def test_a_paused_trial_that_ran_ends_pruned_when_its_study_ends() -> None:
    ran, never_ran = TrialFacts(configured=True, began=True), TrialFacts(configured=True, began=False)
    for end in (S.COMPLETED, S.CANCELLED, S.FAILED):
        assert lifecycle.waiting_at_end(ran, end, paused=True).fate is Fate.PRUNE
        assert lifecycle.waiting_at_end(never_ran, end, paused=True).fate is Fate.DROP
    assert lifecycle.after_pause(ran, study_ended=False) == Verdict(Fate.PAUSE)
    assert lifecycle.after_pause(ran, study_ended=True).fate is Fate.FAIL
