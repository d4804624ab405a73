"""Optuna samplers and pruners behind two factories; the rest of the service never names an algorithm."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from app.ml.space import grid_space
from app.schemas.study import StudySpec
from workers import optuna_private


def make_sampler(spec: StudySpec, resolved: dict[str, Any]) -> optuna.samplers.BaseSampler:
    """The sampler a study's spec names. With a seed it draws trial n from a seed derived from (seed, n):
    the same seed gives the same proposals by number, and workers that share it never replay one sequence.
    The grid is always seeded (0 unless the spec gives one), or every worker would pick the same free point.
    """
    seed = spec.sampler.seed
    if seed is None and spec.sampler.name == "grid":
        seed = 0
    if seed is None:
        return _sampler(spec, resolved, None)
    return SeededByTrial(lambda trial: _sampler(spec, resolved, trial, study=seed), seed)


def algorithm(sampler: optuna.samplers.BaseSampler) -> type[optuna.samplers.BaseSampler]:
    """The class of the sampler that proposes trials, under a SeededByTrial."""
    return type(sampler.current) if isinstance(sampler, SeededByTrial) else type(sampler)


def trial_seed(seed: int, number: int) -> int:
    """The seed a study's sampler draws trial `number` from."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def _sampler(spec: StudySpec, resolved: dict[str, Any], seed: int | None,
             study: int | None = None) -> optuna.samplers.BaseSampler:
    """The named sampler, its random state seeded with `seed` (QMC's scramble with the `study` seed)."""
    opts = spec.sampler
    name = opts.name
    startup = {"n_startup_trials": opts.n_startup_trials} if opts.n_startup_trials is not None else {}
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return GridSampler(grid_space(resolved), seed=seed)
    if name == "tpe":
        optuna_private.use_vectorized_log_ndtr()
        multivariate = opts.multivariate
        if multivariate is None:  # Optuna's default: joint for one objective, independent for several
            multivariate = not spec.is_multi_objective
        # group splits the space where conditional entries (momentum) appear; constant_liar keeps parallel
        # workers from proposing the same point while trials run.
        return optuna.samplers.TPESampler(seed=seed, multivariate=multivariate, group=multivariate,
                                          constant_liar=True, **startup)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, **startup)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, **startup)
    if name == "qmc":
        # Scrambled only with a seed, the study's: every worker must draw from the same sequence.
        scramble = study if study is not None else seed
        return optuna.samplers.QMCSampler(qmc_type=opts.qmc_type or "sobol", scramble=scramble is not None,
                                          seed=scramble, independent_sampler=optuna.samplers.RandomSampler(seed),
                                          warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=opts.population_size or 50, seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


class SeededByTrial(optuna.samplers.BaseSampler):
    """A sampler that proposes trial n with a sampler built for it from `trial_seed(seed, n)`.

    Optuna calls `before_trial` with the new trial (and its number) before it samples anything; samplers
    keep what they share between trials in the storage, so a sampler built per trial proposes as the one
    sampler would, only from its own seed.
    """

    def __init__(self, build: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self.build, self.seed = build, seed
        self.current = build(trial_seed(seed, 0))

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.current = self.build(trial_seed(self.seed, trial.number))
        self.current.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.current.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.current.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.current.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.current.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.current.reseed_rng()


class GridSampler(optuna.samplers.BaseSampler):
    """Every point of a grid once: trial n takes point n while no other trial holds it, else a random free
    point (any point once none is free), as Optuna's grid picks them. Unlike Optuna's it never calls
    study.stop() after the last point (outside optimize() that raises; our own budget ends the study, and
    n_trials never exceeds the grid, checked when the study is created).

    A trial holds the point its parameters are, so an enqueued configuration on the grid holds its own
    point and no other. Points are in Optuna's order: parameters by name, the product of their values.
    """

    def __init__(self, search_space: Mapping[str, Sequence[Any]], seed: int | None = None) -> None:
        self.search_space = {name: list(values) for name, values in sorted(search_space.items())}
        self.points = list(itertools.product(*self.search_space.values()))
        self._index = {point: i for i, point in enumerate(self.points)}
        self._random = np.random.RandomState(seed)
        self._chosen: tuple[int, tuple[Any, ...]] | None = None  # (trial number, its point)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if param_name not in self.search_space:
            raise ValueError(f"The parameter name, {param_name}, is not found in the given grid.")
        if self._chosen is None or self._chosen[0] != trial.number:
            self._chosen = (trial.number, self._pick(study, trial.number))
        return self._chosen[1][list(self.search_space).index(param_name)]

    def reseed_rng(self) -> None:
        self._random.seed()

    def _pick(self, study: optuna.Study, number: int) -> tuple[Any, ...]:
        finished, running = set(), set()
        for t in study.get_trials(deepcopy=False):
            point = self._point_of(t.params)
            if point is not None and t.number != number:
                (finished if t.state.is_finished() else running).add(point)
        free = [i for i in range(len(self.points)) if i not in finished and i not in running] or \
            [i for i in range(len(self.points)) if i not in finished]
        if number in free:
            return self.points[number]
        return self.points[int(self._random.choice(free or list(range(len(self.points)))))]

    def _point_of(self, params: dict[str, Any]) -> int | None:
        if not all(name in params for name in self.search_space):
            return None
        try:
            return self._index.get(tuple(params[name] for name in self.search_space))
        except TypeError:  # an unhashable value: not a grid point
            return None


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner a study's spec names; the resource of successive halving and hyperband is epochs."""
    opts = spec.pruner
    name, epochs = opts.name, spec.budget.epochs
    warm = {k: getattr(opts, k) for k in ("n_startup_trials", "n_warmup_steps") if getattr(opts, k) is not None}
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(**warm)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(opts.percentile or 25.0, **warm)
    halving = {"min_resource": opts.min_resource or 1, "reduction_factor": opts.reduction_factor or 3}
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**halving)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(max_resource=epochs, **halving)
    raise ValueError(f"unknown pruner {name!r}")

