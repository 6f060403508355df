"""Soak test: a server under mixed load while clients and workers are killed at random (not run in CI).

    python bench/soak.py                                   # 60 s; table to stdout, JSON to bench/results/
    python bench/soak.py --duration 600 --kill-every 5 --json /tmp/soak.json

What it does:
- writes the example repository into a temp dir and starts `kernelport serve` on a temp unix socket and a
  free gRPC port, with a large `--max-restarts` (a crashed worker is always restarted, after the backoff);
- spawns `--local-clients` processes using `kernelport.Client` and `--grpc-clients` processes using
  `tritonclient.grpc`; each sends batch-1 requests back to back to a model drawn at random (`--models`,
  `--weights`), checks add_sub and identity_16m results against numpy, and sleeps `--error-backoff-ms` after
  a failed request (as a real client would back off);
- after `--warmup` seconds, every `--kill-every` seconds SIGKILLs one worker of a random model (its pid from
  the local socket's `server_status()`), and half a period later SIGKILLs a random client process and
  starts a new one of the same kind;
- samples the server's open file descriptors (/proc/<pid>/fd), its RSS and its workers' RSS, and the
  entries of /dev/shm, before the clients start, after the warm-up, every 5 s, and after the clients are
  gone; growth is reported from the warm-up sample to the end (lanes and buffers made on first use are in
  the warm-up sample, so what grows after it is a leak or a restart's cost);
- reports requests, errors by type (local: the exception class; gRPC: the status code), p50/p99 latency of
  successful requests by transport and model, and for each worker kill the time to recover: from the kill
  to the end of the first successful request of that model *started after* the kill.

Clients report to the parent over one pipe each (never a shared queue: a client killed while holding a
queue's lock would wedge every other one); what a killed client had not yet sent is lost, which is at most
its last quarter second. Timestamps are CLOCK_MONOTONIC, which every process on the host shares.

Spawned client processes import this file as `__mp_main__`, so it imports no framework at module level.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import random
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from typing import Any

import numpy as np

from kernelport.server.process import ServerProcess, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
FLUSH_S = 0.25
SAMPLE_S = 5.0
OK = "ok"


# ---- the client processes ----------------------------------------------------------------------------


def _inputs_for(metadata: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    batched = int(metadata["max_batch_size"]) > 0
    return {
        t["name"]: rng.standard_normal(([1] if batched else []) + [int(d) for d in t["dims"]], dtype=np.float32)
        for t in metadata["inputs"]
    }


def _wrong(model: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> bool:
    """True when an output differs from its numpy reference (add_sub, identity_16m; mlp is not checked)."""
    if model.startswith("add_sub"):
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return not (np.allclose(outputs["OUTPUT0"], a + b) and np.allclose(outputs["OUTPUT1"], a - b))
    if model.startswith("identity"):
        return not np.array_equal(outputs["OUTPUT0"], inputs["INPUT0"])
    return False


class _LocalRequester:
    def __init__(self, socket_path: str, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.client: Any = None

    def _connect(self) -> Any:
        from kernelport import Client

        if self.client is None:
            self.client = Client(self.socket_path, timeout=self.timeout)
        return self.client

    def metadata(self, model: str) -> dict[str, Any]:
        return dict(self._connect().model_metadata(model))

    def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(self._connect().infer(model, inputs, timeout=self.timeout))

    def outcome(self, exc: BaseException) -> str:
        from kernelport import ServerUnavailableError

        if isinstance(exc, ServerUnavailableError) and self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
            self.client = None  # reconnect on the next request
        return f"local:{type(exc).__name__}"


class _GrpcRequester:
    def __init__(self, url: str, timeout: float) -> None:
        import tritonclient.grpc as grpcclient

        self.grpcclient = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.timeout = timeout

    def metadata(self, model: str) -> dict[str, Any]:
        md = self.client.get_model_metadata(model, as_json=True)
        config = self.client.get_model_config(model, as_json=True)["config"]
        batched = int(config.get("max_batch_size", 0)) > 0
        return {
            "max_batch_size": int(config.get("max_batch_size", 0)),
            "inputs": [{"name": t["name"], "dims": [int(d) for d in t["shape"]][1 if batched else 0 :]}
                       for t in md["inputs"]],
        }  # fmt: skip

    def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        grpc_inputs = []
        for name, arr in inputs.items():
            x = self.grpcclient.InferInput(name, list(arr.shape), "FP32")
            x.set_data_from_numpy(arr)
            grpc_inputs.append(x)
        result = self.client.infer(model, grpc_inputs, client_timeout=self.timeout)
        return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response(as_json=True)["outputs"]}

    def outcome(self, exc: BaseException) -> str:
        status = getattr(exc, "status", None)
        code = status() if callable(status) else None
        return f"grpc:{str(code).removeprefix('StatusCode.')}" if code else f"grpc:{type(exc).__name__}"


def client_main(kind: str, socket_path: str, grpc_url: str, models: list[str], weights: list[float], seed: int,
                stop_at: float, timeout: float, error_backoff: float, conn: Connection) -> None:
    """One client process: requests until `stop_at` (CLOCK_MONOTONIC), records sent every FLUSH_S."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when clients end
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    requester: Any = _LocalRequester(socket_path, timeout) if kind == "local" else _GrpcRequester(grpc_url, timeout)
    inputs: dict[str, dict[str, np.ndarray]] = {}
    while not inputs and time.monotonic() < stop_at:
        try:
            inputs = {m: _inputs_for(requester.metadata(m), nprng) for m in models}
        except Exception as exc:  # the server may be restarting a model: try again
            requester.outcome(exc)
            time.sleep(0.1)
    outcomes: list[str] = [OK, "wrong-result"]
    records: list[tuple[int, float, float, int]] = []
    last_flush = time.monotonic()
    while time.monotonic() < stop_at:
        mi = rng.choices(range(len(models)), weights)[0]
        model = models[mi]
        t0 = time.monotonic()
        try:
            out = requester.infer(model, inputs[model])
            outcome = 1 if _wrong(model, inputs[model], out) else 0
        except Exception as exc:
            name = requester.outcome(exc)
            if name not in outcomes:
                outcomes.append(name)
            outcome = outcomes.index(name)
        t1 = time.monotonic()
        records.append((mi, t0, t1, outcome))
        if outcome:
            time.sleep(error_backoff)
        if t1 - last_flush >= FLUSH_S:
            conn.send((np.array(records, dtype=np.float64), list(outcomes)))
            records.clear()
            last_flush = t1
    if records:
        conn.send((np.array(records, dtype=np.float64), list(outcomes)))
    conn.close()


# ---- the server --------------------------------------------------------------------------------------


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _server_status(socket_path: str) -> dict[str, Any]:
    from kernelport import Client

    with Client(socket_path, timeout=10) as c:
        return dict(c.server_status())


def _sample(server: ServerProcess, socket_path: str, t0: float, label: str) -> dict[str, Any]:
    pid = server.pid
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None
    try:
        workers = [p for m in _server_status(socket_path).values() for p in m.get("workers", [])]
    except Exception:
        workers = []
    worker_rss = [r for r in (_rss_kib(p) for p in workers) if r is not None]
    return {
        "label": label,
        "t_s": round(time.monotonic() - t0, 2),
        "server_fds": fds,
        "server_rss_kib": _rss_kib(pid),
        "workers": len(workers),
        "workers_rss_kib": sum(worker_rss),
        "dev_shm_entries": len(_dev_shm()),
        "dev_shm_names": sorted(_dev_shm()),
    }


def _dev_shm() -> list[str]:
    try:
        return os.listdir("/dev/shm")
    except OSError:
        return []


# ---- the run -----------------------------------------------------------------------------------------


@dataclass
class ClientSlot:
    kind: str
    process: Any
    conn: Connection
    seed: int


@dataclass
class Collected:
    """Every record the clients sent: arrays of (model index, start, end, outcome index) per client."""

    chunks: list[tuple[np.ndarray, list[str], str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _reader(slots: dict[int, ClientSlot], collected: Collected, done: threading.Event,
            slots_lock: threading.Lock) -> None:
    while True:
        with slots_lock:
            conns = {s.conn: s for s in slots.values()}
        if not conns:
            if done.is_set():
                return
            time.sleep(0.05)
            continue
        for conn in wait_connections(list(conns), timeout=0.2):
            slot = conns[conn]  # type: ignore[index]
            try:
                records, outcomes = conn.recv()  # type: ignore[union-attr]
            except (EOFError, OSError):
                with slots_lock:
                    for k, s in list(slots.items()):
                        if s.conn is conn:
                            del slots[k]
                conn.close()  # type: ignore[union-attr]
                continue
            with collected.lock:
                collected.chunks.append((records, outcomes, slot.kind))


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kernelport.examples import build_example_repository

    models = args.models.split(",")
    weights = [float(w) for w in args.weights.split(",")]
    if len(weights) != len(models):
        raise SystemExit("--weights needs one weight per model")
    rng = random.Random(args.seed)
    workdir = tempfile.mkdtemp(prefix="kp-soak-")
    repo = os.path.join(workdir, "repo")
    build_example_repository(repo)
    socket_path = os.path.join(workdir, "kp.sock")
    port = free_port()
    server = ServerProcess(repo, socket_path, "--grpc-port", str(port), "--max-restarts", str(args.max_restarts),
                           "--restart-backoff-ms", str(args.restart_backoff_ms))
    grpc_url = f"127.0.0.1:{port}"
    t0 = time.monotonic()
    samples = [_sample(server, socket_path, t0, "start")]

    ctx = mp.get_context("spawn")
    stop_at = t0 + args.duration
    slots: dict[int, ClientSlot] = {}
    slots_lock = threading.Lock()
    collected = Collected()
    done = threading.Event()
    next_id = 0

    def start_client(kind: str) -> None:
        nonlocal next_id
        seed = rng.randrange(2**31)
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=client_main, name=f"soak-{kind}",
                        args=(kind, socket_path, grpc_url, models, weights, seed, stop_at, args.request_timeout,
                              args.error_backoff_ms / 1000.0, send), daemon=True)  # fmt: skip
        p.start()
        send.close()
        with slots_lock:
            slots[next_id] = ClientSlot(kind, p, recv, seed)
            next_id += 1

    for _ in range(args.local_clients):
        start_client("local")
    for _ in range(args.grpc_clients):
        start_client("grpc")
    reader = threading.Thread(target=_reader, args=(slots, collected, done, slots_lock), daemon=True)
    reader.start()

    worker_kills: list[dict[str, Any]] = []
    client_kills: list[dict[str, Any]] = []
    deck: list[str] = []
    warm_end = t0 + args.warmup
    next_worker_kill = warm_end
    next_client_kill = warm_end + args.kill_every / 2
    next_sample = warm_end
    warm_sampled = False
    while time.monotonic() < stop_at:
        now = time.monotonic()
        if now >= next_sample:
            samples.append(_sample(server, socket_path, t0, "warm" if not warm_sampled else "run"))
            warm_sampled = True
            next_sample += SAMPLE_S
        if args.kill_every > 0 and now >= next_worker_kill:
            next_worker_kill += args.kill_every
            try:
                status = _server_status(socket_path)
            except Exception as exc:
                worker_kills.append({"t_s": round(now - t0, 3), "error": f"server_status failed: {exc}"})
                continue
            ready = [m for m in models if status.get(m, {}).get("state") == "READY" and status[m].get("workers")]
            if ready:
                # Models in turn, in a shuffled order each round, so that every model is killed as often.
                if not set(deck) & set(ready):
                    deck = rng.sample(models, len(models))
                model = next(m for m in deck if m in ready)
                deck.remove(model)
                pid = int(rng.choice(status[model]["workers"]))
                kill_t = time.monotonic()
                try:
                    os.kill(pid, signal.SIGKILL)
                    worker_kills.append({"t": kill_t, "t_s": round(kill_t - t0, 3), "model": model, "pid": pid})
                except ProcessLookupError:
                    pass
            else:
                worker_kills.append({"t_s": round(now - t0, 3), "skipped": "no model READY",
                                     "states": {m: status.get(m, {}).get("state") for m in models}})  # fmt: skip
        if args.kill_every > 0 and now >= next_client_kill:
            next_client_kill += args.kill_every
            with slots_lock:
                alive = [s for s in slots.values() if s.process.is_alive()]
            if alive:
                victim = rng.choice(alive)
                victim.process.kill()
                victim.process.join(10)
                client_kills.append({"t_s": round(time.monotonic() - t0, 3), "kind": victim.kind,
                                     "pid": victim.process.pid})  # fmt: skip
                if time.monotonic() < stop_at - 2:
                    start_client(victim.kind)
        time.sleep(min(0.05, max(0.0, stop_at - time.monotonic())))

    # The clients end by themselves at stop_at; give them their request timeout to finish the last one.
    with slots_lock:
        remaining = [s.process for s in slots.values()]
    for p in remaining:
        p.join(args.request_timeout + 5)
        if p.is_alive():
            p.kill()
            p.join(5)
    done.set()
    reader.join(10)
    time.sleep(2.0)  # let the server reclaim the last connections
    server_alive = server.proc.poll() is None
    samples.append(_sample(server, socket_path, t0, "end"))
    exit_code = server.stop()
    log = server.log()
    shutil.rmtree(workdir, ignore_errors=True)

    return _report(args, models, collected, worker_kills, client_kills, samples, t0, server, server_alive,
                   exit_code, log)  # fmt: skip


def _report(args: argparse.Namespace, models: list[str], collected: Collected, worker_kills: list[dict[str, Any]],
            client_kills: list[dict[str, Any]], samples: list[dict[str, Any]], t0: float, server: ServerProcess,
            server_alive: bool, exit_code: int, log: str) -> dict[str, Any]:
    # One table of all records: model, start, end, outcome name, transport.
    model_idx, starts, ends, outcome_names, kinds = [], [], [], [], []
    for records, outcomes, kind in collected.chunks:
        if not len(records):
            continue
        model_idx.append(records[:, 0].astype(int))
        starts.append(records[:, 1])
        ends.append(records[:, 2])
        outcome_names.append(np.array(outcomes, dtype=object)[records[:, 3].astype(int)])
        kinds.append(np.full(len(records), kind, dtype=object))
    m = np.concatenate(model_idx) if model_idx else np.zeros(0, int)
    s = np.concatenate(starts) if starts else np.zeros(0)
    e = np.concatenate(ends) if ends else np.zeros(0)
    o = np.concatenate(outcome_names) if outcome_names else np.zeros(0, dtype=object)
    k = np.concatenate(kinds) if kinds else np.zeros(0, dtype=object)
    ok = o == OK
    lat_ms = (e - s) * 1000.0

    rows = []
    for kind in ("local", "grpc"):
        for mi, model in enumerate(models):
            sel = (k == kind) & (m == mi)
            good = sel & ok
            rows.append({
                "transport": kind, "model": model, "requests": int(sel.sum()), "ok": int(good.sum()),
                "errors": int((sel & ~ok).sum()), "errors_by_type": dict(Counter(str(x) for x in o[sel & ~ok])),
                "p50_ms": _percentile(lat_ms[good], 50),
                "p99_ms": _percentile(lat_ms[good], 99),
            })  # fmt: skip
    errors = Counter(str(x) for x in o[~ok])

    recoveries = []
    for kill in worker_kills:
        if "model" not in kill:
            continue
        mi = models.index(kill["model"])
        after = ok & (m == mi) & (s >= kill["t"])
        first_end = float(e[after].min()) if after.any() else None
        failed = (m == mi) & ~ok & (e >= kill["t"]) & ((e <= first_end) if first_end is not None else True)
        recoveries.append({
            "t_s": kill["t_s"], "model": kill["model"], "pid": kill["pid"],
            "recovery_ms": round((first_end - kill["t"]) * 1000.0, 1) if first_end is not None else None,
            "errors_until_recovery": int(failed.sum()),
        })  # fmt: skip

    def growth(key: str) -> int | None:
        warm = next((x for x in samples if x["label"] == "warm"), samples[0])
        end = samples[-1]
        if warm.get(key) is None or end.get(key) is None:
            return None
        return int(end[key] - warm[key])

    duration = float(e.max() - s.min()) if e.size else 0.0
    rec = [r["recovery_ms"] for r in recoveries if r["recovery_ms"] is not None]
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "settings": {k2: v for k2, v in vars(args).items() if k2 != "json"},
        "requests": int(len(o)), "ok": int(ok.sum()), "errors": int((~ok).sum()),
        "requests_per_s": round(len(o) / duration, 1) if duration else None,
        "p50_ms": _percentile(lat_ms[ok], 50), "p99_ms": _percentile(lat_ms[ok], 99),
        "errors_by_type": dict(errors.most_common()),
        "by_transport_and_model": rows,
        "worker_kills": recoveries,
        "worker_kills_skipped": [x for x in worker_kills if "model" not in x],
        "recovery_ms": {"count": len(rec), "not_recovered": len(recoveries) - len(rec),
                        "median": float(np.median(rec)) if rec else None, "max": max(rec) if rec else None},
        "client_kills": client_kills,
        "samples": samples,
        "growth_from_warm_to_end": {key: growth(key) for key in
                                    ("server_fds", "server_rss_kib", "workers_rss_kib", "dev_shm_entries")},
        # /dev/shm is the host's: other processes' entries count too; these are the names that appeared.
        "dev_shm_new_names": sorted(set(samples[-1]["dev_shm_names"]) - set(samples[0]["dev_shm_names"])),
        "server": {"alive_at_end": server_alive, "exit_code": exit_code,
                   "tracebacks_in_log": log.count("Traceback"), "tracebacks": _tracebacks(log)},
    }  # fmt: skip


def _tracebacks(log: str) -> list[str]:
    """Each traceback in the server's log, with the line before it (what was being done)."""
    lines = log.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                j += 1
            out.append("\n".join(lines[max(0, i - 1) : j + 1]))
    return out


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_table(r: dict[str, Any]) -> None:
    print(f"soak {r['date']}  {r['settings']['duration']:.0f} s, kill every {r['settings']['kill_every']} s, "
          f"{r['settings']['local_clients']} local + {r['settings']['grpc_clients']} gRPC clients, "
          f"{r['machine']['cpus']} CPUs")
    print(f"host load average at end (1, 5, 15 min): {r['machine']['load_average_at_end']}")
    print(f"requests {r['requests']}  ok {r['ok']}  errors {r['errors']}  ({_fmt(r['requests_per_s'], 1)}/s)  "
          f"p50 {_fmt(r['p50_ms'])} ms  p99 {_fmt(r['p99_ms'])} ms")
    print()
    print(f"{'transport':<10}{'model':<15}{'requests':>10}{'ok':>10}{'errors':>8}{'p50 ms':>10}{'p99 ms':>10}")
    for row in r["by_transport_and_model"]:
        print(f"{row['transport']:<10}{row['model']:<15}{row['requests']:>10}{row['ok']:>10}{row['errors']:>8}"
              f"{_fmt(row['p50_ms']):>10}{_fmt(row['p99_ms']):>10}")
    print()
    print("errors by type: " + (", ".join(f"{k} {v}" for k, v in r["errors_by_type"].items()) or "none"))
    print()
    print(f"{'worker kill at s':<18}{'model':<15}{'recovery ms':>12}{'errors until':>14}")
    for kill in r["worker_kills"]:
        print(f"{kill['t_s']:<18.1f}{kill['model']:<15}{_fmt(kill['recovery_ms'], 1):>12}"
              f"{kill['errors_until_recovery']:>14}")
    rec = r["recovery_ms"]
    print(f"recovered {rec['count']}, not recovered {rec['not_recovered']}, median {_fmt(rec['median'], 1)} ms, "
          f"max {_fmt(rec['max'], 1)} ms; skipped kills {len(r['worker_kills_skipped'])}; "
          f"client kills {len(r['client_kills'])}")
    print()
    print(f"{'sample':<8}{'t s':>8}{'server fds':>12}{'server RSS MiB':>16}{'workers':>9}{'workers RSS MiB':>17}"
          f"{'/dev/shm':>10}")
    for smp in r["samples"]:
        if smp["label"] == "run":
            continue
        rss = smp["server_rss_kib"] / 1024 if smp["server_rss_kib"] is not None else None
        print(f"{smp['label']:<8}{smp['t_s']:>8.1f}{_fmt(smp['server_fds']):>12}{_fmt(rss, 1):>16}"
              f"{smp['workers']:>9}{smp['workers_rss_kib'] / 1024:>17.1f}{_fmt(smp['dev_shm_entries']):>10}")
    g = r["growth_from_warm_to_end"]
    print(f"growth warm -> end: server fds {_fmt(g['server_fds'])}, server RSS {_fmt(g['server_rss_kib'])} KiB, "
          f"workers RSS {_fmt(g['workers_rss_kib'])} KiB, /dev/shm entries {_fmt(g['dev_shm_entries'])}")
    if r["dev_shm_new_names"]:
        print(f"/dev/shm names new since start (any process on the host): {', '.join(r['dev_shm_new_names'][:10])}")
    srv = r["server"]
    print(f"server alive at end: {srv['alive_at_end']}, exit code {srv['exit_code']}, "
          f"tracebacks in its log {srv['tracebacks_in_log']}")
    for tb in srv["tracebacks"]:
        print("  " + tb.replace("\n", "\n  "))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load, warm-up included (default 60)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before the first kill (default 5)")
    p.add_argument("--kill-every", type=float, default=5.0,
                   help="seconds between worker kills, and between client kills (0: no kills; default 5)")
    p.add_argument("--local-clients", type=int, default=3, help="local client processes (default 3)")
    p.add_argument("--grpc-clients", type=int, default=3, help="gRPC client processes (default 3)")
    p.add_argument("--models", default="add_sub,mlp,identity_16m")
    p.add_argument("--weights", default="6,3,1", help="relative frequency of each model's requests")
    p.add_argument("--request-timeout", type=float, default=10.0, help="per request, seconds (default 10)")
    p.add_argument("--error-backoff-ms", type=float, default=20.0, help="a client's pause after a failed request")
    p.add_argument("--max-restarts", type=int, default=100000, help="passed to the server (default 100000)")
    p.add_argument("--restart-backoff-ms", type=float, default=250.0, help="passed to the server (default 250)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="where to write the JSON (default: bench/results/soak-<date>.json)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    path = args.json or os.path.join(
        HERE, "results", f"soak-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"JSON: {path}")
    return 0 if result["server"]["alive_at_end"] else 1


if __name__ == "__main__":
    sys.exit(main())
