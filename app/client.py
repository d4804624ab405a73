"""A Python client of the hpsearch REST API, typed with the service's own schemas; the CLI is built on it.

    from app.client import Client
    hps = Client("http://127.0.0.1:8000", key)
    study = hps.studies.create(spec)          # a StudySpec or a dict of one
    study = hps.studies.follow(study.id)      # a progress bar until it ends
    hps.trials.page(study.id, sort="value").data[0]

Every failure is an `ApiError` (status, message); a 422 is an `InvalidRequest` carrying the field path (`loc`)
and message the API gave, so a caller can point at the part of the spec to change.
"""

from __future__ import annotations

import io
import re
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import httpx

from app.schemas.ensemble import EnsemblePublic, PredictionsPublic
from app.schemas.insights import ImportancePublic, RungsPublic
from app.schemas.study import StudiesPublic, StudyPublic, StudySpec
from app.schemas.trial import EnqueuedPublic, TrialDetail, TrialPublic, TrialsPublic

API_PREFIX = "/api/v1"
DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = frozenset({"completed", "cancelled", "failed"})
POLL_INTERVAL_S = 1.0
FULL_ID = re.compile(r"[0-9a-f]{32}")
SHORT_ID = re.compile(r"[0-9a-f]{1,31}")


# ---- errors ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """The API answered with an error, or could not be reached (status None)."""

    def __init__(self, status: int | None, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        if self.status is None:
            return f"error: {self.message}"
        return f"error {self.status} {self.reason}: {self.message}".replace(" :", ":")


class Unreachable(ApiError):
    """No answer at all: a wrong URL, or no server listening there."""


class BadResponse(ApiError):
    """An answer that is not the API's JSON (a proxy's page, say): the URL points somewhere else."""


class Unauthorized(ApiError):
    """401: no key, or a wrong or revoked one."""


class NotFound(ApiError):
    """404: no such study, trial, dataset or file for this key's owner."""


class AmbiguousId(ApiError):
    """A short study id that starts more than one of your studies' ids; `matches` lists them."""

    def __init__(self, prefix: str, matches: list[str]) -> None:
        shown = ", ".join(matches[:10]) + (", ..." if len(matches) > 10 else "")
        super().__init__(None, f"{prefix!r} starts {len(matches)} study ids ({shown}): give more of the id")
        self.matches = matches


class Conflict(ApiError):
    """409: the request does not apply in the resource's current state (cancel a completed study)."""


class RateLimited(ApiError):
    """429: this key sent too many requests; retry after `retry_after` seconds."""

    def __init__(self, status: int, message: str, *, reason: str = "", retry_after: float | None = None) -> None:
        super().__init__(status, message, reason=reason)
        self.retry_after = retry_after


class Unavailable(RateLimited):
    """503: the service's database is unavailable for a moment; retry after `retry_after` seconds."""


@dataclass(frozen=True)
class FieldError:
    """One broken rule of a request: where (`loc`, as the API gives it) and what."""

    loc: tuple[str | int, ...]
    message: str
    type: str = ""

    @property
    def field(self) -> str:
        """The dotted path inside the body, query or path: `objective.metric`."""
        parts = self.loc[1:] if self.loc and self.loc[0] in ("body", "query", "path", "header") else self.loc
        return ".".join(str(p) for p in parts) or str(self.loc[0] if self.loc else "request")


class InvalidRequest(ApiError):
    """422: the request breaks a rule; `errors` lists each, `loc` and `message` are the first one's."""

    def __init__(self, status: int, errors: list[FieldError], *, reason: str = "") -> None:
        text = "; ".join(f"{e.field}: {e.message}" for e in errors) or "invalid request"
        super().__init__(status, text, reason=reason)
        self.errors = errors
        first = errors[0] if errors else FieldError((), text)
        self.loc = first.loc
        self.field = first.field
        self.field_message = first.message


_BY_STATUS: dict[int, type[ApiError]] = {401: Unauthorized, 404: NotFound, 409: Conflict}


def error_from_response(response: httpx.Response, limit: int = 300) -> ApiError:
    """The typed error for an error answer, built from the API's body (`{"detail": str | [{loc, msg}]}`)."""
    status, reason = response.status_code, response.reason_phrase
    try:
        body = response.json()
    except ValueError:
        return BadResponse(status, _plain_text(response.text, limit), reason=reason)
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if status == 422 and isinstance(detail, list):
        errors = [FieldError(tuple(e.get("loc", ())), str(e.get("msg", "")), str(e.get("type", "")))
                  for e in detail if isinstance(e, dict)]
        return InvalidRequest(status, errors, reason=reason)
    message = detail if isinstance(detail, str) else str(detail)
    if status in (429, 503):
        retry = response.headers.get("Retry-After")
        kind = RateLimited if status == 429 else Unavailable
        return kind(status, message, reason=reason, retry_after=float(retry) if retry and retry.isdigit() else None)
    return _BY_STATUS.get(status, ApiError)(status, message, reason=reason)


def _plain_text(text: str, limit: int) -> str:
    """A body that is not JSON as one short line: proxies answer with HTML or plain text."""
    flat = " ".join(re.sub(r"<[^>]*>", " ", text).split())
    return (flat[:limit] + "...") if len(flat) > limit else (flat or "(empty body)")


# ---- the client -----------------------------------------------------------------------------------------


class Client:
    """hpsearch at `url` with API key `key`. `http` may be any httpx.Client (FastAPI's TestClient, say)."""

    def __init__(self, url: str = DEFAULT_URL, key: str | None = None, *, timeout_s: float = 30.0,
                 http: httpx.Client | None = None) -> None:
        self.url = url.rstrip("/")
        self.key = key or None
        self.http = http if http is not None else httpx.Client(timeout=timeout_s)
        self.studies = Studies(self)
        self.trials = Trials(self)
        self.datasets = Datasets(self)
        self.downloads = Downloads(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r}, key={'set' if self.key else 'none'})"

    # -- transport --

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The successful response to `method path` (under /api/v1), or the typed ApiError."""
        headers = {**kwargs.pop("headers", {}), **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        try:
            response = self.http.request(method, self.url + API_PREFIX + path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise Unreachable(None, f"cannot reach the API at {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:  # e.g. a proxy's sign-in page: the URL points somewhere else
            raise BadResponse(response.status_code, f"{self.url} answered {response.status_code} with a body "
                              f"that is not JSON: {_plain_text(response.text, 200)}",
                              reason=response.reason_phrase) from None

    def full_id(self, study_id: str) -> str:
        """The id of your study that `study_id` names: the id itself, or a unique prefix of it (the 8
        characters the dashboard and `hpsearch status` show). NotFound when none starts so; AmbiguousId when
        several do."""
        if FULL_ID.fullmatch(study_id) or not SHORT_ID.fullmatch(study_id):
            return study_id  # a full id, or not an id at all: the API answers for it
        matches = [s.id for s in self.studies.iterate(page_size=500) if s.id.startswith(study_id)]
        if not matches:
            raise NotFound(404, f"no study of yours has an id starting {study_id!r}", reason="Not Found")
        if len(matches) > 1:
            raise AmbiguousId(study_id, matches)
        return matches[0]

    # -- the rest of the API --

    def predict(self, study_id: str, inputs: list[Any], *, use: Literal["best", "ensemble"] = "best"
                ) -> PredictionsPublic:
        """Predictions (and class probabilities) of the study's best trial or its ensemble for raw inputs."""
        body = self.json("POST", f"/studies/{self.full_id(study_id)}/predict", params={"use": use},
                         json={"inputs": inputs})
        return PredictionsPublic.model_validate(body)

    def workers(self) -> list[dict[str, Any]]:
        """Live workers: devices, slots, heartbeat, and which of your trials each one runs."""
        return list(self.json("GET", "/workers")["data"])

    def search_space(self, model: str = "mlp") -> list[dict[str, Any]]:
        """The documented hyperparameters of a model family with their default ranges."""
        return list(self.json("GET", "/search-space", params={"model": model})["hyperparameters"])


class _Part:
    def __init__(self, client: Client) -> None:
        self._c = client

    def _study(self, study_id: str, rest: str = "") -> str:
        """The path of a study (named by its id or a unique prefix), and of `rest` under it."""
        return f"/studies/{self._c.full_id(study_id)}{rest}"


class Studies(_Part):
    """Create, read and steer studies."""

    def create(self, spec: StudySpec | Mapping[str, Any], *, idempotency_key: str | None = None) -> StudyPublic:
        """Submit a study; a dict is sent as it is (the API validates it and answers 422 with the field)."""
        body = spec.model_dump(mode="json", exclude_unset=True) if isinstance(spec, StudySpec) else dict(spec)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return StudyPublic.model_validate(self._c.json("POST", "/studies", json=body, headers=headers))

    def get(self, study_id: str) -> StudyPublic:
        return StudyPublic.model_validate(self._c.json("GET", self._study(study_id)))

    def list(self, *, status: str | None = None, limit: int = 50, cursor: str | None = None) -> StudiesPublic:
        """One page of your studies, newest first; `next_cursor` fetches the next."""
        params = {k: v for k, v in (("status", status), ("limit", limit), ("cursor", cursor)) if v is not None}
        return StudiesPublic.model_validate(self._c.json("GET", "/studies", params=params))

    def iterate(self, *, status: str | None = None, page_size: int = 100) -> Iterator[StudyPublic]:
        """Every study, page after page."""
        cursor: str | None = None
        while True:
            page = self.list(status=status, limit=page_size, cursor=cursor)
            yield from page.data
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def pause(self, study_id: str) -> StudyPublic:
        return StudyPublic.model_validate(self._c.json("POST", self._study(study_id, "/pause")))

    def resume(self, study_id: str) -> StudyPublic:
        return StudyPublic.model_validate(self._c.json("POST", self._study(study_id, "/resume")))

    def cancel(self, study_id: str) -> StudyPublic:
        """Stop a queued, running or paused study (Conflict once it has ended)."""
        return StudyPublic.model_validate(self._c.json("POST", self._study(study_id, "/cancel")))

    def delete(self, study_id: str) -> None:
        """Remove the study, its trials and their files."""
        self._c.request("DELETE", self._study(study_id))

    def wait(self, study_id: str, *, timeout_s: float | None = None,
             interval_s: float = POLL_INTERVAL_S) -> StudyPublic:
        """The study once it has ended (completed, cancelled or failed); TimeoutError after timeout_s."""
        return self.follow(study_id, out=None, timeout_s=timeout_s, interval_s=interval_s)

    def follow(self, study_id: str, *, out: IO[str] | None = sys.stdout, timeout_s: float | None = None,
               interval_s: float = POLL_INTERVAL_S) -> StudyPublic:
        """Draw a progress bar on `out` (redrawn in place) until the study ends; the ended study."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        study_id = self._c.full_id(study_id)  # once, not at every poll
        while True:
            study = self.get(study_id)
            if out is not None:
                out.write("\r" + progress_line(study))
                out.flush()
            if study.status in FINISHED:
                if out is not None:
                    out.write("\n")
                return study
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"study {study_id} still {study.status} after {timeout_s}s")
            time.sleep(interval_s)

    def importance(self, study_id: str) -> ImportancePublic:
        """Parameter importance, most important first (empty, with a reason, before enough trials)."""
        return ImportancePublic.model_validate(self._c.json("GET", self._study(study_id, "/importance")))

    def rungs(self, study_id: str) -> RungsPublic:
        """Where the study's scheduler pauses trials, and per rung how many reached it, wait there, went on."""
        return RungsPublic.model_validate(self._c.json("GET", self._study(study_id, "/rungs")))

    def ensemble(self, study_id: str) -> EnsemblePublic:
        """The completed study's ensemble: members, weights, validation and test metrics."""
        return EnsemblePublic.model_validate(self._c.json("GET", self._study(study_id, "/ensemble")))


class Trials(_Part):
    """A study's trials."""

    def page(self, study_id: str, *, sort: Literal["number", "value", "duration", "newest"] = "number",
             order: Literal["asc", "desc"] | None = None, state: str | None = None, limit: int = 50,
             cursor: str | None = None, after: int | None = None) -> TrialsPublic:
        query = {"sort": sort, "order": order, "state": state, "limit": limit, "cursor": cursor, "after": after}
        params = {k: v for k, v in query.items() if v is not None}
        return TrialsPublic.model_validate(self._c.json("GET", self._study(study_id, "/trials"), params=params))

    def iterate(self, study_id: str, *, sort: Literal["number", "value", "duration", "newest"] = "number",
                state: str | None = None, page_size: int = 500) -> Iterator[TrialPublic]:
        """Every trial, page after page."""
        cursor: str | None = None
        study_id = self._c.full_id(study_id)
        while True:
            page = self.page(study_id, sort=sort, state=state, limit=page_size, cursor=cursor)
            yield from page.data
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def get(self, study_id: str, number: int) -> TrialDetail:
        """One trial with its per-epoch curve, worker, device, attempts and error."""
        return TrialDetail.model_validate(self._c.json("GET", self._study(study_id, f"/trials/{number}")))

    def pause(self, study_id: str, number: int) -> TrialDetail:
        """Pause a trial: a running one at its next epoch boundary, after a checkpoint of it, which frees its
        slot; a waiting one at once (Conflict once it has ended)."""
        return TrialDetail.model_validate(self._c.json("POST", self._study(study_id, f"/trials/{number}/pause")))

    def resume(self, study_id: str, number: int) -> TrialDetail:
        """Put a paused trial back in line, to continue from its checkpoint (Conflict when it is not paused)."""
        return TrialDetail.model_validate(self._c.json("POST", self._study(study_id, f"/trials/{number}/resume")))

    def extend(self, study_id: str, number: int, epochs: int) -> TrialDetail:
        """Train a complete trial `epochs` more, on from its checkpoint (Conflict when it is not complete or
        keeps no checkpoint); a completed study runs again and is evaluated on test once more afterwards."""
        return TrialDetail.model_validate(self._c.json("POST", self._study(study_id, f"/trials/{number}/extend"),
                                                       json={"epochs": epochs}))

    def enqueue(self, study_id: str, params: Mapping[str, Any], *, allow_duplicate: bool = False
                ) -> EnqueuedPublic:
        """Queue a configuration ahead of the sampled ones (validated against the study's space)."""
        body = {"params": dict(params), "allow_duplicate": allow_duplicate}
        return EnqueuedPublic.model_validate(self._c.json("POST", self._study(study_id, "/trials"), json=body))


class Datasets(_Part):
    """Built-in datasets and your uploads."""

    def list(self) -> list[dict[str, Any]]:
        return list(self._c.json("GET", "/datasets")["data"])

    def get(self, dataset_id: str) -> dict[str, Any]:
        """A dataset's description: task, shape, classes, feature groups."""
        return dict(self._c.json("GET", f"/datasets/{dataset_id}"))

    def upload(self, file: str | Path | bytes | None = None, *, kind: Literal["csv", "npz", "idx"] = "csv",
               name: str = "upload", label_column: str | None = None,
               task: Literal["classification", "regression"] | None = None,
               feature_groups: Mapping[str, list[str]] | None = None,
               images: str | Path | bytes | None = None, labels: str | Path | bytes | None = None
               ) -> dict[str, Any]:
        """Upload a CSV (with `label_column`), an NPZ (X, y) or MNIST IDX files (`images`, `labels`); the
        answer's `id` (`dataset:...`) goes in a spec's `dataset`."""
        import json

        form = {"kind": kind, "name": name, "label_column": label_column, "task": task,
                "feature_groups": json.dumps(dict(feature_groups)) if feature_groups else None}
        parts = {"file": file, "images": images, "labels": labels}
        files = {field: _file_part(field, value) for field, value in parts.items() if value is not None}
        return dict(self._c.json("POST", "/datasets", data={k: v for k, v in form.items() if v is not None},
                                 files=files))


def _file_part(field: str, value: str | Path | bytes) -> tuple[str, bytes]:
    if isinstance(value, bytes):
        return field, value
    path = Path(value)
    return path.name, path.read_bytes()


class Downloads(_Part):
    """Trained models to take home."""

    def trial_model(self, study_id: str, number: int, into: str | Path) -> Path:
        """Unpack one trial's model.safetensors and config.json into the folder `into`."""
        return self._unzip(self._study(study_id, f"/trials/{number}/model"), Path(into))

    def ensemble(self, study_id: str, into: str | Path) -> Path:
        """Unpack the completed study's ensemble (ensemble.json and its members) into `into`."""
        return self._unzip(self._study(study_id, "/ensemble/model"), Path(into))

    def export(self, study_id: str, into: str | Path) -> Export:
        """The best trial's model into `into`, and the ensemble into `into/ensemble` once there is one."""
        study_id = self._c.full_id(study_id)
        study = self._c.studies.get(study_id)
        if study.best_trial is None:
            raise NotFound(404, f"study {study_id} has no finished model yet", reason="Not Found")
        out = Path(into)
        self.trial_model(study_id, study.best_trial.number, out)
        try:
            ensemble: Path | None = self.ensemble(study_id, out / "ensemble")
        except NotFound:  # chosen when the study completes
            ensemble = None
        return Export(folder=out, trial_number=study.best_trial.number, ensemble=ensemble)

    def _unzip(self, path: str, into: Path) -> Path:
        response = self._c.request("GET", path)
        zipfile.ZipFile(io.BytesIO(response.content)).extractall(into)
        return into


@dataclass(frozen=True)
class Export:
    folder: Path
    trial_number: int
    ensemble: Path | None


# ---- text for people ------------------------------------------------------------------------------------


def best_text(study: StudyPublic) -> str:
    """The best value so far; '-' before any trial finished, all values when several."""
    best = study.best_trial
    if best and best.value is not None:
        return f"{best.value:.4f}"
    if best and best.values:
        return "/".join(f"{v:.4f}" for v in best.values)
    return "-"


def progress_line(study: StudyPublic, width: int = 30) -> str:
    p = study.progress
    filled = int(width * p.finished / max(1, p.n_trials))
    return (f"[{'#' * filled}{'.' * (width - filled)}] {p.finished}/{p.n_trials}  running {p.running}  "
            f"pruned {p.pruned}  failed {p.fail}  best {best_text(study)}  {study.status}")


HpsearchClient = Client  # the same class under a name that says whose client it is
