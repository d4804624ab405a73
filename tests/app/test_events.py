"""The SSE stream on SQLite and PostgreSQL: events in order, resume after Last-Event-ID, live, then end."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from app.core.config import Settings
from app.core.db import Database
from app.models import Study, TrialState
from app.models.base import utcnow
from app.services import events, keys
from app.services.events import Cursor, StreamOptions
from tests.factories import API, client_for, create_study_via_api
from tests.study_rows import finalize, write_trials
from workers import leasing

FAST = StreamOptions(poll_s=0.05, settle_s=0.0, keepalive_s=0.2, max_s=20.0)


def _parse(text: str) -> list[dict[str, Any]]:
    """SSE text into {event, id, data} records; comments and the retry field are skipped."""
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "event" in fields:
            out.append({"event": fields["event"], "id": fields.get("id"), "data": json.loads(fields["data"])})
    return out


def _all_events(db: Database, study_id: str) -> list[events.Event]:
    with db.read_session() as session:
        return events.events_in_tx(session, study_id, after=Cursor(0), until=utcnow())


def test_each_trial_starts_reports_epochs_and_finishes_in_order(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    study_id = create_study_via_api(client, budget={"n_trials": 7, "max_parallel": 1})
    write_trials(db, settings, study_id=study_id, n=7)
    got = _all_events(db, study_id)
    ids = [e.cursor.encode() for e in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # strictly increasing, also as strings
    for number in range(7):
        kinds = [e.kind for e in got if e.data["number"] == number]
        assert kinds[0] == "trial_started" and kinds[-1] == "trial_finished"
        assert set(kinds[1:-1]) <= {"epoch"}
    finished = {e.data["number"]: e.data for e in got if e.kind == "trial_finished"}
    trial = client.get(f"{API}/studies/{study_id}/trials/3").json()
    assert finished[3]["state"] == trial["state"] == "pruned" and finished[3]["value"] == trial["value"]
    assert finished[6]["state"] == "fail" and finished[6]["error"]
    assert finished[0]["params"] == client.get(f"{API}/studies/{study_id}/trials/0").json()["params"]
    epochs_of_0 = [e.data["val_metric"] for e in got if e.kind == "epoch" and e.data["number"] == 0]
    assert epochs_of_0 == [p["val_metric"] for p in trial_curve(client, study_id, 0)]


def trial_curve(client: TestClient, study_id: str, number: int) -> list[dict[str, Any]]:
    return list(client.get(f"{API}/studies/{study_id}/trials/{number}").json()["curve"])


def test_last_event_id_resumes_without_loss_or_duplicates(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    client.app.state.event_stream_options = FAST  # type: ignore[attr-defined]
    study_id = create_study_via_api(client, budget={"n_trials": 4, "max_parallel": 1})
    write_trials(db, settings, study_id=study_id, n=4)
    finalize(db)
    everything = _all_events(db, study_id)
    resume_after = everything[4].cursor.encode()
    headers = {"Last-Event-ID": resume_after}
    with client.stream("GET", f"{API}/studies/{study_id}/events", headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        received = _parse(r.read().decode())
    assert received[0]["event"] == "study_status" and received[0]["id"] is None
    trial_events = [e for e in received if e["id"] is not None]
    assert [e["id"] for e in trial_events] == [e.cursor.encode() for e in everything[5:]]
    assert received[-1] == {"event": "end", "id": None, "data": {"reason": "completed"}}
    statuses = [e["data"] for e in received if e["event"] == "study_status"]
    assert statuses[-1]["status"] == "completed" and statuses[-1]["progress"]["finished"] == 4


def test_a_stream_delivers_trials_written_while_it_is_open(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    study_id = create_study_via_api(client, budget={"n_trials": 3, "max_parallel": 1})
    start = events.start_cursor(db, owner="alice", study_id=study_id, last_event_id=None, settle_s=0.0)

    async def follow() -> list[str]:
        chunks = []
        async for chunk in events.stream(db, owner="alice", study_id=study_id, cursor=start, options=FAST):
            chunks.append(chunk)
        return chunks

    async def run() -> list[str]:
        reader = asyncio.create_task(follow())
        await asyncio.sleep(0.2)  # the stream is open and idle before the first trial starts
        await asyncio.to_thread(write_trials, db, settings, study_id=study_id, n=3)
        await asyncio.to_thread(finalize, db)
        return await asyncio.wait_for(reader, 20)

    received = _parse("".join(asyncio.run(run())))
    kinds = [e["event"] for e in received]
    assert kinds.count("trial_started") == 3 and kinds.count("trial_finished") == 3
    assert kinds.count("epoch") == 9  # three complete trials of three epochs
    assert kinds[0] == "study_status" and kinds[-1] == "end"
    assert received[-2]["data"]["status"] == "completed"


def test_keepalive_comments_while_nothing_happens(settings: Settings, db: Database) -> None:
    client = client_for(settings, db)
    study_id = create_study_via_api(client, budget={"n_trials": 2, "max_parallel": 1})
    start = events.start_cursor(db, owner="alice", study_id=study_id, last_event_id=None)
    options = StreamOptions(poll_s=0.05, settle_s=0.0, keepalive_s=0.1, max_s=0.5)

    async def collect() -> str:
        return "".join([c async for c in events.stream(db, owner="alice", study_id=study_id, cursor=start,
                                                        options=options)])

    text = asyncio.run(collect())
    assert ": keep-alive" in text
    assert [e["event"] for e in _parse(text)] == ["study_status"]  # ends at max_s; the client reconnects


def test_events_of_another_owner_are_not_found_and_bad_ids_refused(settings: Settings, db: Database) -> None:
    alice, bob = client_for(settings, db, "alice"), client_for(settings, db, "bob")
    study_id = create_study_via_api(alice, budget={"n_trials": 1, "max_parallel": 1})
    assert bob.get(f"{API}/studies/{study_id}/events").status_code == 404
    assert alice.get(f"{API}/studies/{'0' * 32}/events").status_code == 404
    bad = alice.get(f"{API}/studies/{study_id}/events", headers={"Last-Event-ID": "1; DROP TABLE"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["header", "last-event-id"]
    assert TestClient(alice.app).get(f"{API}/studies/{study_id}/events").status_code == 401


def test_event_ids_round_trip_and_sort_as_text() -> None:
    a = Cursor(1_700_000_000_000_000, events.EPOCH, 42, 1, 3)
    b = Cursor(1_700_000_000_000_000, events.FINISHED, 7, 1, 0)
    assert Cursor.parse(a.encode()) == a and a < b and a.encode() < b.encode()


def _poll_like_a_stream(db: Database, study_id: str, cursor: Cursor) -> tuple[list[events.Event], Cursor]:
    """One poll of the stream with no settle window; the cursor moves to the last event sent."""
    got, _ = events._poll(db, study_id, cursor, utcnow())
    return got, (got[-1].cursor if got else cursor)


def test_a_trial_bound_after_later_trials_ran_still_starts_exactly_once(settings: Settings,
                                                                         db: Database) -> None:
    """A slow ask: trial A is claimed, then trial B runs to its end, then A gets its number."""
    client = client_for(settings, db)
    study_id = create_study_via_api(client, budget={"n_trials": 2, "max_parallel": 1})
    with db.session() as session:
        session.execute(update(Study).where(Study.id == study_id).values(max_parallel=2))
    slow = leasing.claim_trial(db, worker_id="slow", device="cpu", trial_deadline_s=600)
    assert slow is not None and slow.number is None
    cursor, sent = Cursor(0), []
    write_trials(db, settings, study_id=study_id, n=1)  # B: claimed, bound, epochs 1..3, finished
    got, cursor = _poll_like_a_stream(db, study_id, cursor)
    sent += got
    bound = leasing.bind_trial(db, slow, number=1, optuna_trial_id=10**6, params={"units": 32})
    assert bound is not None
    for epoch in (1, 2):
        leasing.record_epoch(db, bound, epoch=epoch, train_loss=0.5, val_loss=0.5, val_metric=0.8,
                             learning_rate=0.01, seconds=0.01)
    assert leasing.finish_trial(db, bound, state=TrialState.COMPLETE, value=0.8, values=[0.8], epochs_run=2,
                                best_epoch=2)
    got, cursor = _poll_like_a_stream(db, study_id, cursor)
    sent += got
    got, cursor = _poll_like_a_stream(db, study_id, cursor)
    assert got == []  # nothing left, nothing sent twice
    started = [e.data["number"] for e in sent if e.kind == "trial_started"]
    assert sorted(started) == [0, 1]
    assert [e.cursor for e in sent] == sorted(e.cursor for e in sent)
    assert [(e.data["number"], e.data["epoch"]) for e in sent if e.kind == "epoch"] \
        == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    assert sorted(e.data["number"] for e in sent if e.kind == "trial_finished") == [0, 1]


class _OpenStream:
    """One GET /events driven through the ASGI app directly: open until `disconnect` is called."""

    def __init__(self, app: Any, authorization: str, study_id: str) -> None:
        self.status: asyncio.Future[tuple[int, dict[str, str]]] = asyncio.get_running_loop().create_future()
        self._gone = asyncio.Event()
        path = f"{API}/studies/{study_id}/events"
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
                 "headers": [(b"host", b"testserver"), (b"authorization", authorization.encode())]}
        self.task = asyncio.create_task(app(scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and not self.status.done():
            headers = {k.decode(): v.decode() for k, v in message["headers"]}
            self.status.set_result((message["status"], headers))

    async def opened(self) -> tuple[int, dict[str, str]]:
        return await asyncio.wait_for(asyncio.shield(self.status), 30)

    async def disconnect(self) -> None:
        self._gone.set()
        await asyncio.wait_for(self.task, 30)


def test_open_streams_per_key_are_limited(settings: Settings, db: Database) -> None:
    limited = settings.model_copy(update={"max_streams_per_key": 2})
    client = client_for(limited, db)
    client.app.state.event_stream_options = FAST  # type: ignore[attr-defined]
    study_id = create_study_via_api(client, budget={"n_trials": 2, "max_parallel": 1})
    key_a = client.headers["Authorization"]
    key_b = f"Bearer {keys.create_key(db, owner='alice')}"  # the same owner's other key has its own limit

    async def scenario() -> list[int]:
        first, second = _OpenStream(client.app, key_a, study_id), _OpenStream(client.app, key_a, study_id)
        statuses = [(await first.opened())[0], (await second.opened())[0]]
        third = _OpenStream(client.app, key_a, study_id)
        status, headers = await third.opened()
        await asyncio.wait_for(third.task, 30)  # refused: it ends at once
        assert int(headers["retry-after"]) >= 1
        other_key = _OpenStream(client.app, key_b, study_id)
        statuses += [status, (await other_key.opened())[0]]
        await first.disconnect()  # its slot comes back
        again = _OpenStream(client.app, key_a, study_id)
        statuses.append((await again.opened())[0])
        for stream in (second, other_key, again):
            await stream.disconnect()
        return statuses

    assert asyncio.run(scenario()) == [200, 200, 429, 200, 200]
    limiter = client.app.state.stream_limiter  # type: ignore[attr-defined]
    assert limiter.open_streams(keys.hash_key(key_a.removeprefix("Bearer "))) == 0
