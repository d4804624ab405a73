"""Population-based training run by the workers: a generation's exploit and explore, under the claim's lock.

Every member trains `interval_epochs` and pauses at that boundary with its checkpoint, as an ASHA trial pauses
at a rung. Once every member has started and none runs or waits (the barrier: Ray Tune's synchronous PBT),
the claim that finds it starts the next generation: for each member paused at the lowest boundary,
`workers.schedulers.Pbt` (the code `benchmarks/lcbench.py` replays) keeps it, or names a top member whose
checkpoint it continues from with explored values. The checkpoint file is linked into the member's own
folder while no runner holds either trial, so the source's next checkpoint cannot delete it underneath.
The member's row records the new schedule (the source's, up to the copied epoch, then the new values) and
goes back in line; its Optuna trial runs on, so each member is one Optuna trial with its starting values as
params and its schedule as the user attribute `pbt_schedule`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.ml.space import Context, resolve_space
from app.models import Study, Trial, TrialEpoch, TrialState, current_curve
from app.schemas.scheduler import PbtConfig
from app.schemas.study import StudySpec
from workers.checkpoints.files import TEMP_SUFFIX
from workers.schedulers import Exploit, Member, Pbt, Range

log = logging.getLogger(__name__)


def pbt_of(spec: StudySpec) -> Pbt | None:
    """The study's PBT scheduler, its mutable hyperparameters bounded by the study's search ranges."""
    config = spec.scheduler
    if not isinstance(config, PbtConfig):
        return None
    space = resolve_space(spec.space_entries(), Context(model=spec.model))
    ranges = {name: Range(space[name].low, space[name].high, log=space[name].log) for name in config.mutable}
    return Pbt(config, ranges, maximize=spec.maximize)


def schedule_of(trial: Trial) -> list[dict[str, Any]]:
    """The trial's schedule, its starting values as the first step when it never changed them."""
    return trial.schedule or [{"epoch": 0, "params": dict(trial.params or {})}]


def params_in_force(trial: Trial) -> dict[str, Any] | None:
    return dict(trial.schedule[-1]["params"]) if trial.schedule else trial.params


def first_due_in_tx(session: Session, study: Study) -> int | None:
    """The member that continues first at the barrier: the lowest boundary's, lowest number."""
    return session.scalar(_paused(study).with_only_columns(Trial.number)
                          .order_by(Trial.rung, Trial.number).limit(1))


def start_generation_in_tx(session: Session, study: Study, artifact_dir: Path | None) -> None:
    """Exploit and explore for every member paused at the lowest boundary, and put them back in line.

    Without the artifact store at hand (None) or the source's file, a member keeps its own checkpoint.
    """
    spec = study.config
    pbt = pbt_of(spec)
    assert pbt is not None
    paused = session.scalars(_paused(study).order_by(Trial.number)).all()
    if not paused:
        return
    values = _values_at_boundary(session, paused)
    population = [Member(t.number, t.rung, values.get(t.id, math.nan), params_in_force(t) or {},
                         changed_at=schedule_of(t)[-1]["epoch"]) for t in paused]
    by_number = {t.number: t for t in paused}
    boundary = min(t.rung for t in paused)
    for member, trial in zip(population, paused, strict=True):
        if trial.rung != boundary:
            continue  # ahead of the others (they restarted behind it): it waits for them
        decision = pbt.on_epoch(member, population, random.Random(f"{spec.seed}:{boundary}:{trial.number}"))
        if isinstance(decision, Exploit) and artifact_dir is not None:
            _exploit(trial, by_number[decision.source], decision, artifact_dir)
        trial.state, trial.rung = TrialState.WAITING.value, None


def _paused(study: Study) -> Any:
    return select(Trial).where(Trial.study_id == study.id, Trial.state == TrialState.PAUSED.value,
                               Trial.rung.is_not(None), Trial.checkpoint_path.is_not(None))


def _values_at_boundary(session: Session, trials: list[Trial]) -> dict[int, float]:
    """Each paused member's objective at the boundary it waits at (its current attempt's epoch there)."""
    return dict(session.execute(select(Trial.id, TrialEpoch.val_metric).join(
        TrialEpoch, current_curve() & (TrialEpoch.epoch == Trial.rung)).where(
        Trial.id.in_([t.id for t in trials]), TrialEpoch.val_metric.is_not(None))).all())


def _exploit(trial: Trial, source: Trial, step: Exploit, artifact_dir: Path) -> None:
    """Continue `trial` from `source`'s checkpoint with the explored values; its schedule records how."""
    assert source.checkpoint_path is not None and trial.checkpoint_path is not None
    try:
        path, size = _link_checkpoint(artifact_dir / source.checkpoint_path,
                                      (artifact_dir / trial.checkpoint_path).parent)
    except OSError as exc:  # e.g. a machine without the shared volume: it goes on from its own
        log.warning("trial %s keeps its checkpoint: %s's is unreadable (%s)", trial.number, source.number, exc)
        return
    inherited = [s for s in schedule_of(source) if s["epoch"] < step.source_epoch]
    trial.schedule = [*inherited, {"epoch": step.source_epoch, "params": step.params, "source": source.number,
                                   "source_epoch": step.source_epoch}]
    trial.checkpoint_path = str(path.relative_to(artifact_dir))
    trial.checkpoint_epoch, trial.checkpoint_bytes = source.checkpoint_epoch, size


def _link_checkpoint(source: Path, folder: Path) -> tuple[Path, int]:
    """`source` under its own name in `folder`, atomically (it may replace the member's checkpoint of that
    epoch); a hard link where the file system allows one, else a copy."""
    final = folder / source.name
    temp = folder / f".{source.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"
    try:
        os.link(source, temp)
    except OSError:
        if not source.is_file():
            raise
        shutil.copyfile(source, temp)
    os.replace(temp, final)
    return final, final.stat().st_size
