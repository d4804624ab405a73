"""100 clients polling a study's status and trial pages against a real `hpsearch serve` while it trains.

Phases run side by side in one run, each on an identical study (every hyperparameter fixed, so every trial
does the same work): quiet, loaded (the clients poll), quiet, loaded, quiet. The trials' epoch times of each
loaded phase are compared with those of the quiet phases around it, so a machine whose speed drifts during
the run does not pass for the clients' doing; the clients' latencies and errors are counted.

    .venv/bin/python -m benchmarks.load                       # 60 s phases, 100 clients (the recorded run)
    .venv/bin/python -m benchmarks.load --seconds 15 --rounds 1 --out /tmp/load.json   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import machine, write_json
from benchmarks.harness import API, Service, running_service

TARGET_SLOWDOWN = 1.10
# One fixed configuration: each epoch of each trial is the same work, so epoch times compare directly.
FIXED_SPACE = {"n_layers": 2, "units": 256, "layer_shape": "constant", "activation": "relu",
               "batch_norm": "none", "dropout": 0.0, "weight_decay": 1e-6, "weight_init": "he_normal",
               "optimizer": "adam", "learning_rate": 1e-3, "lr_schedule": "constant", "batch_size": 32}


def study_spec(name: str, epochs: int) -> dict[str, Any]:
    return {"name": name, "dataset": "builtin:digits", "model": "mlp",
            "objective": {"metric": "val_accuracy", "direction": "maximize"}, "search_space": FIXED_SPACE,
            "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
            "budget": {"n_trials": 10_000, "epochs": epochs, "patience": None, "max_parallel": 1}}


@dataclass
class Polls:
    """What the clients saw: latency in seconds per endpoint, and every failure."""

    latency: dict[str, list[float]] = field(default_factory=lambda: {"status": [], "trials": []})
    errors: list[str] = field(default_factory=list)

    def summary(self, seconds: float) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": sum(len(v) for v in self.latency.values()) + len(self.errors),
                               "errors": len(self.errors), "error_samples": self.errors[:5]}
        out["per_s"] = round(out["requests"] / seconds, 1)
        for name, values in [*self.latency.items(), ("all", [x for v in self.latency.values() for x in v])]:
            out[name] = _percentiles(values)
        return out


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 1)}


async def _client(base: str, key: str, study_id: str, until: float, poll_s: float, polls: Polls) -> None:
    """One dashboard: the study's status, then the trials that finished since its last look, every poll_s."""
    headers = {"Authorization": f"Bearer {key}"}
    last = -1  # incremental polling, as the dashboard does: only trials numbered after the last one seen
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
        await asyncio.sleep(random.uniform(0, poll_s))  # clients do not arrive in lockstep
        while time.monotonic() < until:
            for name, path, params in (("status", f"/studies/{study_id}", None),
                                       ("trials", f"/studies/{study_id}/trials", {"limit": 50, "after": last})):
                start = time.perf_counter()
                try:
                    response = await http.get(path, params=params)
                    if response.status_code != 200:
                        polls.errors.append(f"{name}: {response.status_code} {response.text[:100]}")
                        continue
                    body = response.json()
                except httpx.HTTPError as exc:
                    polls.errors.append(f"{name}: {type(exc).__name__} {exc}")
                    continue
                polls.latency[name].append(time.perf_counter() - start)
                if name == "trials" and body["data"]:
                    last = max(last, max(t["number"] for t in body["data"]))
            await asyncio.sleep(poll_s)


async def _poll_all(base: str, keys: list[str], study_id: str, seconds: float, poll_s: float) -> Polls:
    polls = Polls()
    until = time.monotonic() + seconds
    await asyncio.gather(*(_client(base, k, study_id, until, poll_s, polls) for k in keys))
    return polls


@dataclass
class Phase:
    name: str
    clients: int
    epoch_s: list[float]
    trial_s: list[float]
    trials: int
    seconds: float
    polls: dict[str, Any] | None
    cores: dict[str, float]

    def summary(self) -> dict[str, Any]:
        return {"phase": self.name, "clients": self.clients, "trials_finished": self.trials,
                "trials_per_min": round(self.trials / self.seconds * 60, 1),
                "epoch_median_s": round(statistics.median(self.epoch_s), 4) if self.epoch_s else None,
                "trial_median_s": round(statistics.median(self.trial_s), 3) if self.trial_s else None,
                "polls": self.polls, "cores": self.cores}


def _parse(moment: str | None) -> datetime | None:
    if moment is None:
        return None
    value = datetime.fromisoformat(moment)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def run_phase(service: Service, name: str, keys: list[str], seconds: float, poll_s: float,
              epochs: int) -> Phase:
    """One identical study: wait for its first trial, train (with or without clients) for `seconds`, cancel."""
    study_id, _ = service.submit(study_spec(f"load-{name}", epochs))
    deadline = time.monotonic() + 120
    while service.study(study_id)["progress"]["finished"] < 1:  # the first trial pays for warm-up
        if time.monotonic() > deadline:
            raise RuntimeError(f"no trial finished in 120 s; see {service.log}")
        time.sleep(0.2)
    began = datetime.now(UTC)
    base = f"http://127.0.0.1:{service.port}{API}"
    cpu_before = _cpu_s(service.server_pid), time.process_time()
    if keys:
        polls: dict[str, Any] | None = asyncio.run(_poll_all(base, keys, study_id, seconds, poll_s)).summary(seconds)
    else:
        polls = None
        time.sleep(seconds)
    ended = datetime.now(UTC)
    # Cores the API process and these clients kept busy: on a small machine they compete with training.
    cores = {"api": round((_cpu_s(service.server_pid) - cpu_before[0]) / seconds, 2),
             "clients": round((time.process_time() - cpu_before[1]) / seconds, 2)}
    service.http.post(f"/studies/{study_id}/cancel").raise_for_status()
    inside = [t for t in service.trials(study_id) if t["state"] == "complete"
              and (s := _parse(t["started_at"])) is not None and s >= began
              and (f := _parse(t["finished_at"])) is not None and f <= ended]
    epoch_s: list[float] = []
    for t in inside:
        curve = service.http.get(f"/studies/{study_id}/trials/{t['number']}").json()["curve"]
        epoch_s += [p["seconds"] for p in curve if p["seconds"] is not None]
    return Phase(name, len(keys), epoch_s, [t["duration_s"] for t in inside], len(inside), seconds, polls, cores)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--poll", type=float, default=2.0,
                        help="seconds between one client's polls (the dashboard's fallback polls every 3 s)")
    parser.add_argument("--rounds", type=int, default=2, help="loaded phases, each between two quiet ones")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial")
    parser.add_argument("--slots", type=int, default=2, help="trial slots of the served worker")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)

    from app.core.db import Database
    from app.services import keys as api_keys

    # `hpsearch serve` as it starts by default on a CPU machine: 2 slots, one torch thread per trial. A trial
    # given every core (--slots 1) loses ~40% to any other load, since its OpenMP threads wait on each other.
    with running_service(slots=args.slots) as service:
        db = Database(f"sqlite:///{service.home / 'hpsearch.db'}")
        keys = [api_keys.create_key(db, owner="bench") for _ in range(args.clients)]  # a key per client
        db.dispose()
        plan = ["quiet"] + ["loaded", "quiet"] * args.rounds
        phases = [run_phase(service, f"{name}-{i}", keys if name == "loaded" else [], args.seconds, args.poll,
                            args.epochs) for i, name in enumerate(plan)]
    result = summarize(phases, args)
    write_json(args.out, result)
    _print(result)
    return result


def summarize(phases: list[Phase], args: argparse.Namespace) -> dict[str, Any]:
    """Each loaded phase against the mean of the quiet phases on either side of it (drift cancels out)."""
    def epoch(p: Phase) -> float:
        return statistics.median(p.epoch_s)

    ratios, throughput = [], []
    for i in range(1, len(phases) - 1, 2):
        before, loaded, after = phases[i - 1], phases[i], phases[i + 1]
        ratios.append(epoch(loaded) / statistics.mean([epoch(before), epoch(after)]))
        throughput.append(loaded.trials / statistics.mean([before.trials, after.trials]))
    loaded_polls = [p.polls for p in phases if p.polls]
    errors = sum(p["errors"] for p in loaded_polls)
    slowdown = max(ratios)
    return {
        "machine": machine(), "clients": args.clients, "poll_s": args.poll, "phase_s": args.seconds,
        "epochs_per_trial": args.epochs, "phases": [p.summary() for p in phases],
        "epoch_slowdown_per_round": [round(r, 3) for r in ratios], "epoch_slowdown": round(slowdown, 3),
        "throughput_ratio_per_round": [round(r, 3) for r in throughput], "errors": errors,
        "target": f"zero errors and epoch_slowdown <= {TARGET_SLOWDOWN} in every round",
        "met": errors == 0 and slowdown <= TARGET_SLOWDOWN,
    }


def _print(result: dict[str, Any]) -> None:
    print(f"{result['clients']} clients, a poll every {result['poll_s']} s, {result['phase_s']:.0f} s phases")
    print(f"{'phase':<12} {'trials/min':>10} {'epoch s':>9} {'trial s':>8} {'req/s':>7} {'errors':>6} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'API cores':>9} {'client cores':>12}")
    for p in result["phases"]:
        polls = p["polls"] or {}
        every = polls.get("all", {})
        print(f"{p['phase']:<12} {p['trials_per_min']:>10} {p['epoch_median_s']!s:>9} {p['trial_median_s']!s:>8} "
              f"{polls.get('per_s', '-')!s:>7} {polls.get('errors', '-')!s:>6} {every.get('p50_ms', '-')!s:>7} "
              f"{every.get('p99_ms', '-')!s:>7} {p['cores']['api']!s:>9} {p['cores']['clients']!s:>12}")
    print(f"epoch time loaded / quiet, per round: {result['epoch_slowdown_per_round']}  trials/min loaded / "
          f"quiet: {result['throughput_ratio_per_round']}  errors: {result['errors']}  target met: {result['met']}")


if __name__ == "__main__":
    main()
