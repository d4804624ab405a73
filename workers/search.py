"""Optuna samplers and pruners behind two factories; the rest of the service never names an algorithm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from app.ml.space import grid_space
from app.schemas.study import StudySpec
from workers import truncnorm


def make_sampler(spec: StudySpec, resolved: dict[str, Any]) -> optuna.samplers.BaseSampler:
    """The sampler a study's spec names, seeded when the spec gives a seed."""
    opts = spec.sampler
    name, seed = opts.name, opts.seed
    startup = {"n_startup_trials": opts.n_startup_trials} if opts.n_startup_trials is not None else {}
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return _GridSampler(grid_space(resolved), seed=seed)
    if name == "tpe":
        truncnorm.install()
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
        # Scrambled only with a seed: every worker must draw from the same sequence.
        return optuna.samplers.QMCSampler(qmc_type=opts.qmc_type or "sobol", scramble=seed is not None,
                                          seed=seed, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=opts.population_size or 50, seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid without its study.stop() after the last point: outside optimize() that call raises, and
    our own budget ends the study (n_trials never exceeds the grid, checked when the study is created).

    Trial n takes grid point n, as in Optuna, only while no other trial holds that point: an enqueued
    configuration holds its own point (workers.asking), and Optuna would hand it out a second time.
    """

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
            return
        free = self._get_unvisited_grid_ids(study)
        if trial.number in free:
            grid_id = trial.number
        else:  # as Optuna does once past the first n: a random free point, any point when none is free
            grid_id = int(self._rng.rng.choice(free or list(range(len(self._all_grids)))))
        study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
        study._storage.set_trial_system_attr(trial._trial_id, "grid_id", grid_id)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    state: optuna.trial.TrialState, values: Sequence[float] | None) -> None:
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

