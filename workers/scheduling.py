"""A study's scheduler run by the workers: ASHA's facts read from the study's rows, under the claim's lock
(PBT's generations: `workers.population`).

The decisions are `workers.schedulers.Asha`'s (the offline LCBench benchmark runs the same ones); this
module only reads what they need: each trial's objective at every rung it reached in its current attempt,
and where it waits paused. A trial paused at a rung without a recorded checkpoint is never promoted (it
could not continue); it ends pruned with the study.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Study, Trial, TrialEpoch, TrialState, current_curve
from app.schemas.scheduler import AshaConfig, PbtConfig
from app.schemas.study import StudySpec
from workers import population
from workers.schedulers import Asha, Promote, TrialFacts


def asha_of(spec: StudySpec) -> Asha | None:
    scheduler = spec.scheduler
    if not isinstance(scheduler, AshaConfig):
        return None
    return Asha(scheduler, maximize=spec.maximize)


def next_pause(spec: StudySpec, epoch: int) -> int | None:
    """Where a trial that has trained `epoch` epochs pauses next for its scheduler (an ASHA rung, a PBT
    boundary); None: it trains to the end."""
    return next((pause for pause in spec.scheduler_pauses() if pause > epoch), None)


def promotion_in_tx(session: Session, study: Study, *, idle: bool) -> int | None:
    """The number of the paused trial the study's scheduler promotes now, if any. `idle`: every trial has
    started and none runs or waits; then, while no trial has completed, the best paused one goes on anyway
    (`Asha.best_paused`), so the study ends with a fully trained trial. PBT continues its members only then,
    a whole generation at once (`population.start_generation_in_tx`)."""
    if isinstance(study.config.scheduler, PbtConfig):
        return population.first_due_in_tx(session, study) if idle else None
    asha = asha_of(study.config)
    if asha is None:
        return None
    rows = session.execute(select(Trial.number, Trial.state, Trial.rung, Trial.checkpoint_path, TrialEpoch.epoch,
                                  TrialEpoch.val_metric)
                           .join(TrialEpoch, current_curve())
                           .where(Trial.study_id == study.id, Trial.number.is_not(None),
                                  TrialEpoch.epoch.in_(asha.rungs), TrialEpoch.val_metric.is_not(None))).all()
    values: dict[int, dict[int, float]] = {}
    waits: dict[int, int] = {}
    for number, state, rung, checkpoint, epoch, value in rows:
        values.setdefault(number, {})[epoch] = value
        if state == TrialState.PAUSED.value and rung is not None and checkpoint is not None:
            waits[number] = rung
    facts = [TrialFacts(number, by_rung, waits.get(number) if waits.get(number) == max(by_rung) else None)
             for number, by_rung in values.items()]
    job = asha.next_job(facts)
    if isinstance(job, Promote):
        return job.trial
    if idle and not session.scalar(select(Trial.id).where(Trial.study_id == study.id,
                                                          Trial.state == TrialState.COMPLETE.value).limit(1)):
        best = asha.best_paused(facts)
        return best.trial if best is not None else None
    return None
