"""The study's lifecycle as decisions over plain values: status transitions, the budget and stop criteria,
retry or fail, what becomes of a trial when its study ends, and what Optuna must be told of each change.

SQL modules store what these functions decide (workers.leasing, workers.retries, workers.closing,
app.services.studies, through app.services.fates); no database and no Optuna here, so
tests/app/test_lifecycle.py checks every rule with plain values.
Status: queued -> running -> (paused <-> running) -> completed | cancelled | failed.
A trial: waiting -> running -> (paused -> waiting -> running) -> complete | pruned | fail; a complete one a
client extends: complete -> waiting -> running -> complete (an extension that does not complete leaves the
trial complete as it was).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from app.models.tables import FailureKind, StudyStatus, TrialState
from app.schemas.study import StopSpec

# ---- what Optuna must be told -------------------------------------------------------------------------------


class OptunaTell(NamedTuple):
    """One Optuna trial and how it ends there, as our row just ended (or as a trial nobody will run again)."""

    trial_id: int
    state: TrialState  # COMPLETE, PRUNED or FAIL
    values: list[float] | None = None


def fail_all(trial_ids: Iterable[int | None]) -> list[OptunaTell]:
    """FAIL for each Optuna trial that will never report again (None: the row never had one)."""
    return [OptunaTell(i, TrialState.FAIL) for i in trial_ids if i is not None]


# ---- study status -------------------------------------------------------------------------------------------


class Action(enum.StrEnum):
    """What a client may do to a study's status."""

    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"


_ALLOWED_FROM = {
    Action.PAUSE: {StudyStatus.QUEUED, StudyStatus.RUNNING},
    Action.RESUME: {StudyStatus.PAUSED},
    Action.CANCEL: {StudyStatus.QUEUED, StudyStatus.RUNNING, StudyStatus.PAUSED},
}


class BadTransition(ValueError):
    """The study's status does not allow the action."""


def after_action(status: StudyStatus, action: Action, *, started: bool) -> StudyStatus:
    """The status a client's action leads to; resume goes back to running, or to queued when no trial has
    started yet. BadTransition when `status` does not allow the action."""
    if status not in _ALLOWED_FROM[action]:
        raise BadTransition(f"cannot {action} a {status} study")
    if action is Action.PAUSE:
        return StudyStatus.PAUSED
    if action is Action.CANCEL:
        return StudyStatus.CANCELLED
    return StudyStatus.RUNNING if started else StudyStatus.QUEUED


def after_claim(status: StudyStatus) -> StudyStatus:
    """A queued study runs from its first claimed trial on."""
    return StudyStatus.RUNNING if status is StudyStatus.QUEUED else status


def after_closing(error: str | None) -> StudyStatus:
    """How a study whose budget is spent ends once its final evaluation is done (or could not be)."""
    return StudyStatus.FAILED if error else StudyStatus.COMPLETED


def may_fail(status: StudyStatus) -> bool:
    """Whether a study that can never run (its dataset cannot be split, say) may still be ended failed."""
    return not status.is_finished()


# ---- the budget and stop criteria ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """A study's trials by state; finished = complete + pruned + fail."""

    waiting: int
    running: int
    finished: int
    paused: int = 0  # hold their place in n_trials, not in max_parallel
    extensions: int = 0  # completed trials waiting to be extended (not in `waiting`, nor in `finished`)
    at_rungs: int = 0  # of the paused: paused by the study's scheduler at a rung, not by a client
    promotable: bool = False  # the scheduler would promote one of those now

    @property
    def started(self) -> int:
        """Trials holding a place in n_trials: running, finished, waiting, paused and extensions alike."""
        return self.running + self.finished + self.waiting + self.paused + self.extensions


@dataclass(frozen=True)
class Budget:
    """What limits a study's trials: its spec's budget and the stop it may have been given."""

    n_trials: int
    max_parallel: int
    deadline_at: datetime | None = None
    stop_requested_at: datetime | None = None
    stop_reason: str | None = None


def budget_spent(budget: Budget, counts: Counts, now: datetime) -> str | None:
    """Why no new trial may start, if the study's budget is spent: a stop criterion, n_trials or timeout."""
    if budget.stop_requested_at is not None:
        return budget.stop_reason or "stopped"
    if counts.finished >= budget.n_trials:
        return "n_trials"
    if budget.deadline_at is not None and now >= budget.deadline_at:
        return "timeout"
    return None


class NextTrial(enum.Enum):
    """Which trial a claim leases."""

    EXTENSION = "extension"  # a completed trial a client extended: whatever the budget, first
    WAITING = "waiting"  # a waiting one, in line first
    PROMOTION = "promotion"  # one paused at a rung that its scheduler promotes, before any new trial
    NEW_SLOT = "new_slot"  # a new slot, its configuration asked of the sampler once leased


def next_trial(budget: Budget, counts: Counts, now: datetime) -> NextTrial | None:
    """What a claim may lease now: never more than max_parallel running, never more than n_trials
    running + finished + waiting + paused + extensions, nothing once the budget is spent but the extensions
    a client asked for (the budget bounds the search, not the training of what it found)."""
    if counts.running >= budget.max_parallel:
        return None
    if counts.extensions:
        return NextTrial.EXTENSION
    if budget_spent(budget, counts, now):
        return None
    if counts.waiting:
        return NextTrial.WAITING
    if counts.promotable:
        return NextTrial.PROMOTION
    if counts.started >= budget.n_trials:
        return None
    return NextTrial.NEW_SLOT


def schedule_exhausted(budget: Budget, counts: Counts) -> bool:
    """A scheduler's study whose every trial has started and that has nothing left to run: none runs, waits,
    or earns a promotion, and only its scheduler holds any paused (a client's pause holds the study open).
    Its trials still paused at rungs end pruned with the study."""
    return counts.started >= budget.n_trials and not (counts.running or counts.waiting or counts.extensions
                                               or counts.promotable) and counts.paused == counts.at_rungs


def keeps_running(status: StudyStatus, budget: Budget, now: datetime, *, cancels_running: bool) -> bool:
    """Whether a running trial goes on after its latest epoch: not once its study has ended, nor once a stop
    criterion or the timeout has fired in a study whose spec says that cancels running trials."""
    if status.is_finished():
        return False
    stopped = budget.stop_requested_at is not None or (budget.deadline_at is not None and now >= budget.deadline_at)
    return not (stopped and cancels_running)


def stop_reason(outcomes: Sequence[float | None], *, maximize: bool, stop: StopSpec) -> str | None:
    """Which stop criterion fires, if any, given every finished trial in the order they finished: a complete
    trial's value, None for a pruned or failed one (it counts only as a trial that did not improve)."""
    complete = [v for v in outcomes if v is not None]
    if not complete:
        return None
    best = max(complete) if maximize else min(complete)
    target = stop.target_value
    if target is not None and (best >= target if maximize else best <= target):
        return "target_value"
    patience = stop.no_improvement_trials
    if patience:
        best_so_far: float | None = None
        since = 0
        for value in outcomes:
            improved = value is not None and (best_so_far is None or (
                (value - best_so_far if maximize else best_so_far - value) > stop.min_delta))
            if improved:
                best_so_far, since = value, 0
            else:
                since += 1
        if since >= patience:
            return "no_improvement"
    return None


# ---- what becomes of a trial -------------------------------------------------------------------------------


class Fate(enum.StrEnum):
    """What a state change does to one trial row."""

    DROP = "drop"  # the row goes: it never had a configuration, or never began in a study that ended
    RETRY = "retry"  # back in line with the same parameters, as the next attempt
    RESUME = "resume"  # back in line as the next attempt, to continue from its checkpoint on its Optuna trial
    HAND_BACK = "hand_back"  # back in line as the same attempt (a shutdown is not the trial's failure)
    PAUSE = "pause"  # waits paused as the same attempt, until a client resumes it
    PRUNE = "prune"  # ends PRUNED with its last recorded value (paused when its study ended)
    FAIL = "fail"  # ends FAIL for good


@dataclass(frozen=True)
class Verdict:
    fate: Fate
    error: str | None = None
    failure: FailureKind | None = None


@dataclass(frozen=True)
class TrialFacts:
    """What the rules read of a trial row."""

    configured: bool  # it holds a configuration (a number, or enqueued parameters)
    began: bool  # an Optuna trial was bound to it: it has run, or is running, an attempt
    attempt: int = 1
    checkpointed: bool = False  # a checkpoint of it is recorded: a death need not start it over


# The process died or hung, not the training: a checkpointed trial continues from its checkpoint.
DEATHS = frozenset({FailureKind.LOST, FailureKind.PROCESS_DIED, FailureKind.DEADLINE})


def when_study_ended(trial: TrialFacts, reason: str) -> Verdict:
    """A trial whose study has ended (cancelled, completed or failed): one that never began is dropped, one
    that began ends FAIL (cancelled), its curves kept."""
    if not trial.began:
        return Verdict(Fate.DROP)
    return Verdict(Fate.FAIL, reason, FailureKind.CANCELLED)


def after_failed_attempt(trial: TrialFacts, *, study_ended: bool, max_attempts: int, reason: str,
                         failure: FailureKind, retry: bool = True) -> Verdict:
    """An attempt failed outside its trial's own verdict (its worker was lost, it ran past its deadline, its
    runner died): back in line with the same parameters while attempts remain and `retry` allows, else FAIL.
    A death (`DEATHS`, a deadline included) of a checkpointed trial resumes it from its checkpoint while
    attempts remain, even where `retry` says no (a deadline's: a trial that hangs keeps what it trained, one
    without a checkpoint fails at once); any other failure starts over.

    A sampler's slot that never got a configuration is dropped (another claim makes it again); anything else
    comes back under a new attempt number, an enqueued configuration not yet bound included: the slot that
    held it may still be alive, and its lease must no longer hold. A study that has ended retries nothing.
    """
    if not trial.configured:
        return Verdict(Fate.DROP)
    if study_ended:
        return when_study_ended(trial, f"stopped: the study ended ({reason})")
    if trial.attempt < max_attempts and trial.checkpointed and failure in DEATHS:
        return Verdict(Fate.RESUME, f"attempt {trial.attempt}: {reason}; resumed from its checkpoint", failure)
    if retry and trial.attempt < max_attempts:
        return Verdict(Fate.RETRY, f"attempt {trial.attempt}: {reason}", failure)
    return Verdict(Fate.FAIL, f"{reason}; {max_attempts} attempt(s) used" if retry else reason, failure)


def after_group_failure(trial: TrialFacts, *, study_ended: bool, reason: str, failure: FailureKind) -> Verdict:
    """A fused group's runner ran out of memory or died with this member still open, none of its members to
    blame: back in line under its next attempt whatever attempts remain (it runs solo then, so this happens
    once per trial), from its checkpoint if one is recorded, unless the study has ended. A group is never
    failed wholesale."""
    if not trial.configured:
        return Verdict(Fate.DROP)
    if study_ended:
        return when_study_ended(trial, f"stopped: the study ended ({reason})")
    if trial.checkpointed:
        return Verdict(Fate.RESUME, f"attempt {trial.attempt}: {reason}; resumed from its checkpoint", failure)
    return Verdict(Fate.RETRY, f"attempt {trial.attempt}: {reason}", failure)


def after_hand_back(trial: TrialFacts, *, study_ended: bool) -> Verdict:
    """A worker hands a running trial back unrun (graceful shutdown): it waits for another worker under the
    same attempt, unless its study has ended."""
    if not trial.configured:
        return Verdict(Fate.DROP)
    if study_ended:
        return when_study_ended(trial, "stopped: the study ended")
    return Verdict(Fate.HAND_BACK)


def after_pause(trial: TrialFacts, *, study_ended: bool) -> Verdict:
    """A running trial stopped at an epoch boundary because a client paused it: it waits paused under the same
    attempt, with the checkpoint of that boundary (a trial that keeps none starts over when resumed)."""
    if not trial.configured:
        return Verdict(Fate.DROP)
    if study_ended:
        return when_study_ended(trial, "stopped: the study ended")
    return Verdict(Fate.PAUSE)


def running_at_failure(trial: TrialFacts, error: str) -> Verdict:
    """A trial running when its study fails for good (it can never run): it fails with the study's error,
    blamed on the worker side; its worker finds the study ended at its next epoch."""
    if not trial.configured:
        return Verdict(Fate.DROP)
    return Verdict(Fate.FAIL, error, FailureKind.WORKER_ERROR)


def waiting_at_end(trial: TrialFacts, end: StudyStatus, *, paused: bool = False) -> Verdict:
    """A trial still waiting or paused when its study ends (cancelled, completed or failed). A paused trial
    that has run ends pruned with its last value: it stopped early, and its curve so far is real."""
    if paused and trial.began:
        return Verdict(Fate.PRUNE, "paused when the study ended")
    reason = "cancelled" if end is StudyStatus.CANCELLED else "the study ended"
    return when_study_ended(trial, f"{reason} before its next attempt")


# ---- a client's control of one trial ------------------------------------------------------------------------


class TrialAction(enum.StrEnum):
    PAUSE = "pause"
    RESUME = "resume"


class TrialControl(enum.Enum):
    """What a client's pause or resume does to a trial row."""

    PARK = "park"  # a waiting trial is paused at once
    REQUEST = "request"  # a running trial: its worker pauses it at the next epoch boundary
    UNPARK = "unpark"  # a paused trial goes back in line, to continue from its checkpoint
    WITHDRAW = "withdraw"  # a pause requested but not carried out yet is called off
    NOTHING = "nothing"  # already as asked


def extension_target(state: TrialState, *, checkpoint_epoch: int | None, epochs: int,
                     study: StudyStatus) -> int:
    """The epoch a client's extension of a trial by `epochs` trains it to: on from its checkpoint, which only a
    complete trial whose study keeps it has. BadTransition (saying why) otherwise."""
    if study in (StudyStatus.CANCELLED, StudyStatus.FAILED):
        raise BadTransition(f"cannot extend a trial of a {study} study")
    if state is not TrialState.COMPLETE:
        raise BadTransition(f"cannot extend a {state} trial: only a complete trial continues")
    if checkpoint_epoch is None:
        raise BadTransition("cannot extend it: the trial keeps no checkpoint (the study's keep_checkpoints "
                            "let it go, or it ran without one)")
    return checkpoint_epoch + epochs


def after_trial_action(state: TrialState, action: TrialAction, *, pause_requested: bool,
                       study: StudyStatus) -> TrialControl:
    """What pausing or resuming a trial does; BadTransition (saying why) when its state does not allow it."""
    if state.is_finished():
        raise BadTransition(f"cannot {action} a {state} trial: it has ended")
    if study.is_finished():
        raise BadTransition(f"cannot {action} a trial of a {study} study")
    if action is TrialAction.PAUSE:
        if state is TrialState.PAUSED or (state is TrialState.RUNNING and pause_requested):
            return TrialControl.NOTHING
        return TrialControl.PARK if state is TrialState.WAITING else TrialControl.REQUEST
    if state is TrialState.PAUSED:
        return TrialControl.UNPARK
    if state is TrialState.RUNNING and pause_requested:
        return TrialControl.WITHDRAW
    raise BadTransition(f"cannot resume a {state} trial: it is not paused")
