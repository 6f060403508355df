"""Faults and overload, measured (not run in CI): the robustness issue's figures.

    python bench/faults.py                         # about 2 minutes; table to stdout, JSON to bench/results/
    python bench/faults.py --kills 3 --overload-seconds 3 --json /tmp/faults.json     # shorter

It starts `kernelport serve` over a temp repository (the example `mlp`, and `mlp_bounded`: a slow MLP with
`default_queue_policy { max_queue_size }`) with gRPC on a free port, then:

1. **Worker kills** (`mlp`): `--local-clients` processes (`kernelport.Client.infer`) and `--grpc-clients`
   processes (`tritonclient.grpc`) send batch-1 requests back to back; once every client has had a result,
   and then `--settle` seconds after each recovery, the model's worker is SIGKILLed (its pid from the
   local socket's `server_status()`), `--kills` times. Per kill:
   - **held**: the requests that had started and not yet ended at the kill (mid-batch: the worker is busy
     with batches all the time under this load), and **last answer**: the time from the kill to the end of
     the last of them (every one must end, by an error or, when its batch finished just before the kill
     landed, a result);
   - **ready**: the time from the kill until `server_status()` says READY again (polled every 10 ms, so up
     to 10 ms late), with the restart backoff the server applied (`--restart-backoff-ms`, doubled for each
     earlier crash of the model within 60 s, as `ModelRuntime.worker_died` computes it);
   - **first success**: the time from the kill to the end of the first request started after it that
     succeeded, by transport.
2. **Overload** (`mlp_bounded`, a deep MLP of `--bounded-layers` 2048 x 2048 layers, max batch 8,
   `max_queue_size` `--max-queue-size`): first its capacity, closed loop, from the local client processes
   with `max_queue_size` requests in flight in all (none is rejected); then open-loop requests at
   `--overload-factor` x that rate: the local client processes with `--overload-threads` threads each that
   send on a fixed schedule (a request whose time came while its thread was still waiting goes at once),
   plus the gRPC client processes at `--grpc-rate` each. Reported: the offered and served rates, the
   rejection latency (QueueFullError locally, RESOURCE_EXHAUSTED over gRPC: from the call to the exception)
   p50/p99/max, the latency of the accepted requests p50/p99/max, by transport, and gRPC ServerLive from
   this process every 20 ms meanwhile (an RPC that does no work, under the same load).

Times are CLOCK_MONOTONIC, which every process on the host shares: client processes send their records
(start, end, outcome) over a pipe at the end of each phase. Figures are absolute times, as the issue names
them; the machine's load (`os.getloadavg`) and the CPU share other processes used are recorded with them.
Spawned client processes import this file as `__mp_main__`: frameworks are imported inside functions only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from _bench_clients import stop_clients
from _machine import ForeignLoad
from kernelport.server.process import ServerProcess

HERE = os.path.dirname(os.path.abspath(__file__))
OK, UNAVAILABLE, FULL, OTHER = 0, 1, 2, 3
OUTCOMES = {OK: "ok", UNAVAILABLE: "not ready", FULL: "queue full", OTHER: "other error"}
KILL_MODEL = "mlp"
BOUNDED_MODEL = "mlp_bounded"
BOUNDED_HIDDEN = 2048
BOUNDED_MAX_BATCH = 8


# ---- the repository ----------------------------------------------------------------------------------


def build_repository(root: str, max_queue_size: int, layers: int, model_weight: int = 0) -> None:
    from kernelport.examples import build_example_repository

    examples = os.path.join(root, "examples")
    build_example_repository(examples)
    shutil.copytree(os.path.join(examples, KILL_MODEL), os.path.join(root, KILL_MODEL))
    shutil.rmtree(examples)
    _bounded_model(os.path.join(root, BOUNDED_MODEL), max_queue_size, layers, model_weight)


def _bounded_model(path: str, max_queue_size: int, layers: int, model_weight: int = 0) -> None:
    """512 -> 2048, then `layers` times Relu and 2048 x 2048 (one weight, shared), then -> 512: about
    8.4 MFLOP a sample per layer, so the model serves a few hundred samples/s on one core and the clients
    can offer ten times that without taking the CPU the server needs (they mostly get rejections)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    d_in, hidden = 512, BOUNDED_HIDDEN
    w1 = (rng.standard_normal((d_in, hidden)) / np.sqrt(d_in)).astype(np.float32)
    wh = (rng.standard_normal((hidden, hidden)) * np.sqrt(2.0 / hidden)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, d_in)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["INPUT0", "W1"], ["h0"])]
    for i in range(layers):
        nodes += [helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", "WH"], [f"h{i + 1}"])]
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "W2"], ["OUTPUT0"]))
    graph = helper.make_graph(
        nodes, BOUNDED_MODEL,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", d_in])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", d_in])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(wh, "WH"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    os.makedirs(os.path.join(path, "1"), exist_ok=True)
    onnx.save(model, os.path.join(path, "1", "model.onnx"))
    with open(os.path.join(path, "config.pbtxt"), "w") as f:
        f.write(f'name: "{BOUNDED_MODEL}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {BOUNDED_MAX_BATCH}\n'
                'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 512 ] } ]\n'
                'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 512 ] } ]\n'
                f"dynamic_batching {{\n  preferred_batch_size: [ {BOUNDED_MAX_BATCH} ]\n"
                "  max_queue_delay_microseconds: 500\n"
                f"  default_queue_policy {{ max_queue_size: {max_queue_size} }}\n}}\n")
        if model_weight:  # the worker's CPU weight (nice): the front end then keeps its share of the CPU
            f.write(f'parameters {{ key: "kernelport.model_weight" value: {{ string_value: "{model_weight}" }} }}\n')


# ---- the client processes ----------------------------------------------------------------------------


class _Local:
    def __init__(self, socket_path: str) -> None:
        from kernelport import Client

        self.socket_path = socket_path
        self.client = Client(socket_path, timeout=30.0)

    def infer(self, model: str, x: np.ndarray) -> None:
        self.client.infer(model, {"INPUT0": x})

    def outcome(self, exc: BaseException) -> int:
        from kernelport import ModelNotReadyError, QueueFullError, ServerUnavailableError

        if isinstance(exc, QueueFullError):
            return FULL
        if isinstance(exc, ServerUnavailableError):  # reconnect on the next request
            self.client.close()
            from kernelport import Client

            self.client = Client(self.socket_path, timeout=30.0)
        return UNAVAILABLE if isinstance(exc, ModelNotReadyError) else OTHER


class _Grpc:
    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self.grpcclient = grpcclient
        self.client = grpcclient.InferenceServerClient(url)

    def infer(self, model: str, x: np.ndarray) -> None:
        t = self.grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        t.set_data_from_numpy(x)
        self.client.infer(model, [t], client_timeout=30.0)

    def outcome(self, exc: BaseException) -> int:
        status = getattr(exc, "status", None)
        code = str(status() if callable(status) else "")
        if code.endswith("RESOURCE_EXHAUSTED"):
            return FULL
        return UNAVAILABLE if code.endswith("UNAVAILABLE") else OTHER


def client_main(kind: str, socket_path: str, grpc_url: str, conn: Connection, seed: int, stop: Any,
                started: Any) -> None:
    """One client process: runs the phases the parent sends ((mode, model, seconds, rate, threads) or None
    to end) and answers each with its records: an array of (start, end, outcome) and the other errors' texts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    x = np.random.default_rng(seed).standard_normal((1, 512), dtype=np.float32)
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(run_phase(kind, socket_path, grpc_url, x, job, stop, started))


def run_phase(kind: str, socket_path: str, grpc_url: str, x: np.ndarray, job: tuple[Any, ...], stop: Any,
              started: Any) -> tuple[np.ndarray, dict[str, int]]:
    """`threads` threads, each with its own connection, send requests until `seconds` have passed or the
    parent sets `stop`: back to back (rate 0), or open loop at `rate` requests/s over all threads."""
    _mode, model, seconds, rate, threads = job
    stop_at = time.monotonic() + seconds
    records: list[tuple[float, float, int]] = []
    others: Counter[str] = Counter()
    lock = threading.Lock()
    first_ok = threading.Event()

    def loop(index: int) -> None:
        requester: _Local | _Grpc = _Local(socket_path) if kind == "local" else _Grpc(grpc_url)
        mine: list[tuple[float, float, int]] = []
        # open loop: this thread's requests are due every `threads / rate` s, phase-shifted per thread
        period = threads / rate if rate else 0.0
        due = time.monotonic() + period * index / max(1, threads)
        while True:
            if period:
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                due += period
            t0 = time.monotonic()
            if t0 >= stop_at or stop.is_set():
                break
            try:
                requester.infer(model, x)
                outcome = OK
            except Exception as exc:  # counted by kind; other errors' texts are kept
                outcome = requester.outcome(exc)
                if outcome == OTHER:
                    with lock:
                        others[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
            mine.append((t0, time.monotonic(), outcome))
            if outcome == OK and not first_ok.is_set():
                first_ok.set()
                with started.get_lock():
                    started.value += 1
            if outcome == UNAVAILABLE and not period:
                time.sleep(0.005)  # a real client backs off a little from a model that is restarting
        with lock:
            records.extend(mine)

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return np.array(records, dtype=np.float64).reshape(-1, 3), dict(others)


class Clients:
    def __init__(self, kind: str, n: int, socket_path: str, grpc_url: str, seed: int) -> None:
        ctx = mp.get_context("spawn")
        self.kind = kind
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.stop = ctx.Event()  # ends a phase early
        self.started = ctx.Value("i", 0)  # clients that have had a first success in this phase
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_main, args=(kind, socket_path, grpc_url, child, seed + i, self.stop,
                                                      self.started),
                            daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)

    def start(self, mode: str, model: str, seconds: float, rate: float = 0.0, threads: int = 1) -> None:
        self.started.value = 0
        for c in self.conns:
            c.send((mode, model, seconds, rate, threads))

    def wait_started(self, timeout: float) -> None:
        """Until every client has had a successful request in this phase (connected, lanes mapped)."""
        deadline = time.monotonic() + timeout
        while self.started.value < len(self.conns):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} clients did not start within {timeout:.0f} s")
            time.sleep(0.02)

    def collect(self, timeout: float, stop: bool = False) -> tuple[list[np.ndarray], dict[str, int]]:
        if stop:
            self.stop.set()
        arrays, others = [], Counter()
        for c in self.conns:
            if not c.poll(timeout):
                raise RuntimeError(f"a {self.kind} client did not report back")
            a, o = c.recv()
            arrays.append(a)
            others.update(o)
        self.stop.clear()  # every client has left the phase
        return arrays, dict(others)

    def close(self) -> None:
        stop_clients(self.conns, self.procs)


# ---- measuring ---------------------------------------------------------------------------------------


def _status(client: Any, model: str) -> dict[str, Any]:
    return dict(client.server_status()[model])


def _wait_ready(client: Any, model: str, since: float, timeout: float, old_pid: int) -> float | None:
    """Poll every 10 ms until the model is READY with a new worker; the monotonic time it was first seen so."""
    deadline = since + timeout
    while time.monotonic() < deadline:
        try:
            st = _status(client, model)
            if st["state"] == "READY" and st["workers"] and old_pid not in st["workers"]:
                return time.monotonic()
        except Exception:  # noqa: BLE001 -- the server is busy restarting: ask again
            pass
        time.sleep(0.01)
    return None


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1e3, 2)


def _pcts(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(values) * 1e3
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "max_ms": round(float(a.max()), 3)}


def run_kills(args: argparse.Namespace, sock: str, local: Clients, grpc: Clients) -> dict[str, Any]:
    from kernelport import Client

    seconds = args.kills * (args.settle + 40.0) + 10.0  # at most: the phase ends after the last kill
    t_phase = time.monotonic()
    local.start("closed", KILL_MODEL, seconds)
    grpc.start("closed", KILL_MODEL, seconds)
    kills: list[dict[str, Any]] = []
    crash_times: list[float] = []
    with Client(sock) as c:
        local.wait_started(60.0)
        grpc.wait_started(60.0)
        time.sleep(args.settle)  # every client connected and busy
        for k in range(args.kills):
            if time.monotonic() - t_phase > seconds - 40.0:
                break
            pid = _status(c, KILL_MODEL)["workers"][0]
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            crash_times = [t for t in crash_times if t_kill - t < 60.0] + [t_kill]
            backoff = min(args.restart_backoff_ms / 1e3 * 2 ** (len(crash_times) - 1), 8.0)
            t_ready = _wait_ready(c, KILL_MODEL, t_kill, 30.0, pid)
            kills.append({"t_kill": t_kill, "pid": pid, "t_ready": t_ready, "backoff_s": backoff})
            print(f"  kill {k + 1}/{args.kills}: ready after "
                  f"{'-' if t_ready is None else f'{(t_ready - t_kill) * 1e3:.0f} ms'} (backoff {backoff:.2f} s)",
                  file=sys.stderr, flush=True)
            time.sleep(args.settle)
    local.stop.set()
    grpc.stop.set()
    records = {"local": local.collect(60, stop=True), "grpc": grpc.collect(60, stop=True)}
    rows = []
    for i, kill in enumerate(kills):
        t_kill = kill["t_kill"]
        t_next = kills[i + 1]["t_kill"] if i + 1 < len(kills) else float("inf")
        row: dict[str, Any] = {"kill": i + 1, "ready_ms": _ms(None if kill["t_ready"] is None
                                                               else kill["t_ready"] - t_kill),
                               "backoff_ms": _ms(kill["backoff_s"])}
        for kind, (arrays, _) in records.items():
            a = np.concatenate(arrays) if arrays else np.zeros((0, 3))
            held = a[(a[:, 0] < t_kill) & (a[:, 1] >= t_kill)]
            after = a[(a[:, 0] >= t_kill) & (a[:, 0] < t_next) & (a[:, 2] == OK)]
            row[kind] = {
                "held": int(len(held)),
                "held_failed": int((held[:, 2] != OK).sum()),
                "held_outcomes": dict(Counter(OUTCOMES[int(o)] for o in held[:, 2])),
                "last_answer_ms": _ms(float(held[:, 1].max() - t_kill)) if len(held) else None,
                "first_success_ms": _ms(float(after[:, 1].min() - t_kill)) if len(after) else None,
            }
        rows.append(row)
    others = {kind: r[1] for kind, r in records.items() if r[1]}
    totals = {kind: dict(Counter(OUTCOMES[int(o)] for a in r[0] for o in a[:, 2])) for kind, r in records.items()}
    return {"kills": rows, "other_errors": others, "requests": totals}


class GrpcLiveProbe:
    """ServerLive over gRPC every 20 ms from this process while the overload runs: the gRPC round trip of an
    RPC that does no work, under the same load, to hold the rejection latency against."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.client.is_server_live()
        self.latencies: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.02):
            t0 = time.monotonic()
            try:
                self.client.is_server_live()
            except Exception:  # noqa: BLE001 -- a failed probe is not a latency
                continue
            self.latencies.append(time.monotonic() - t0)

    def stop(self) -> dict[str, float | None]:
        self.done.set()
        self.thread.join(10)
        self.client.close()
        return _pcts(self.latencies)


def run_overload(args: argparse.Namespace, local: Clients, grpc: Clients, grpc_url: str) -> dict[str, Any]:
    # capacity: closed loop, as many requests in flight as the queue holds (never one more: none rejected)
    threads = max(1, args.max_queue_size // len(local.conns))
    local.start("closed", BOUNDED_MODEL, args.overload_seconds, 0.0, threads)
    arrays, _ = local.collect(args.overload_seconds + 60)
    a = np.concatenate(arrays)
    ends = np.sort(a[a[:, 2] == OK][:, 1])
    steady = ends[ends >= ends[0] + 0.5] if len(ends) else ends  # after every client's start-up
    span = float(steady[-1] - steady[0]) if len(steady) > 1 else 0.0
    capacity = (len(steady) - 1) / span if span > 0 else 0.0
    print(f"  capacity of {BOUNDED_MODEL}: {capacity:.0f} requests/s (closed loop, {len(arrays)} x {threads} "
          f"in flight; "
          f"{int((a[:, 2] == FULL).sum())} rejected)", file=sys.stderr, flush=True)
    offered = capacity * args.overload_factor
    grpc_rate = min(args.grpc_rate, offered / 4)
    local_rate = offered - grpc_rate * len(grpc.conns)
    live = GrpcLiveProbe(grpc_url)
    t0 = time.monotonic()
    local.start("open", BOUNDED_MODEL, args.overload_seconds, local_rate / len(local.conns), args.overload_threads)
    grpc.start("open", BOUNDED_MODEL, args.overload_seconds, grpc_rate, 4)
    result: dict[str, Any] = {"capacity_per_s": round(capacity, 1), "target_offered_per_s": round(offered, 1),
                              "overload_factor": args.overload_factor}
    per: dict[str, Any] = {}
    all_sent = all_ok = 0
    for kind, clients in (("local", local), ("grpc", grpc)):
        arrays, others = clients.collect(args.overload_seconds + 60)
        a = np.concatenate(arrays) if arrays else np.zeros((0, 3))
        lat = a[:, 1] - a[:, 0]
        span = args.overload_seconds
        per[kind] = {
            "sent": int(len(a)), "offered_per_s": round(len(a) / span, 1),
            "accepted": int((a[:, 2] == OK).sum()), "rejected": int((a[:, 2] == FULL).sum()),
            "other": int(((a[:, 2] != OK) & (a[:, 2] != FULL)).sum()), "other_errors": others,
            "rejection_latency": _pcts(lat[a[:, 2] == FULL]), "accepted_latency": _pcts(lat[a[:, 2] == OK]),
        }
        all_sent += len(a)
        all_ok += per[kind]["accepted"]
    elapsed = time.monotonic() - t0
    per["grpc"]["server_live_latency"] = live.stop()
    result.update(per_transport=per, offered_per_s=round(all_sent / args.overload_seconds, 1),
                  served_per_s=round(all_ok / args.overload_seconds, 1), elapsed_s=round(elapsed, 1))
    result["offered_vs_capacity"] = round(result["offered_per_s"] / capacity, 2) if capacity else None
    return result


# ---- main --------------------------------------------------------------------------------------------


def print_report(r: dict[str, Any]) -> None:
    k = r["kills"]
    print(f"faults {r['date']}  load average before {r['load_before']}, after {r['load_after']}; other processes "
          f"used {r['others_cpu'] * 100:.0f} % of {os.cpu_count()} CPUs")
    st = r["settings"]
    print(f"\nworker kills ({KILL_MODEL}, {st['local_clients']} local + {st['grpc_clients']} gRPC "
          f"clients, back to back):")
    print(f"{'kill':>4}  {'held L/G':>9}  {'failed L/G':>10}  {'last answer ms L / G':>21}  {'ready ms':>9}  "
          f"{'backoff ms':>10}  {'first ok ms L / G':>18}")
    for row in k["kills"]:
        lo, gr = row["local"], row["grpc"]

        def f(v: Any) -> str:
            return "-" if v is None else f"{v:.1f}"

        print(f"{row['kill']:>4}  {lo['held']:>4}/{gr['held']:<4}  {lo['held_failed']:>5}/{gr['held_failed']:<4}  "
              f"{f(lo['last_answer_ms']):>10} / {f(gr['last_answer_ms']):<8}  {f(row['ready_ms']):>9}  "
              f"{f(row['backoff_ms']):>10}  {f(lo['first_success_ms']):>8} / {f(gr['first_success_ms']):<8}")
    s = r["summary"]
    print(f"max last answer: local {s['max_last_answer_ms']['local']} ms, gRPC {s['max_last_answer_ms']['grpc']} ms; "
          f"max ready {s['max_ready_ms']} ms (minus backoff: {s['max_ready_minus_backoff_ms']} ms); "
          f"max first success {s['max_first_success_ms']} ms")
    print(f"requests during the kills: {k['requests']}" + (f"; other errors: {k['other_errors']}"
                                                           if k["other_errors"] else ""))
    o = r["overload"]
    print(f"\noverload ({BOUNDED_MODEL}, max_queue_size {r['settings']['max_queue_size']}): capacity "
          f"{o['capacity_per_s']:.0f}/s, offered {o['offered_per_s']:.0f}/s = {o['offered_vs_capacity']} x, served "
          f"{o['served_per_s']:.0f}/s")
    print(f"{'transport':<9}  {'sent':>6}  {'accepted':>8}  {'rejected':>8}  {'other':>5}  "
          f"{'reject p50/p99/max ms':>23}  {'accepted p50/p99/max ms':>25}")
    for kind, p in o["per_transport"].items():
        rj, ac = p["rejection_latency"], p["accepted_latency"]
        print(f"{kind:<9}  {p['sent']:>6}  {p['accepted']:>8}  {p['rejected']:>8}  {p['other']:>5}  "
              f"{rj['p50_ms']!s:>7}/{rj['p99_ms']!s:>7}/{rj['max_ms']!s:>7}  "
              f"{ac['p50_ms']!s:>7}/{ac['p99_ms']!s:>8}/{ac['max_ms']!s:>8}")
    lv = o["per_transport"]["grpc"].get("server_live_latency")
    if lv:
        print(f"gRPC ServerLive meanwhile (no work, same load): p50 {lv['p50_ms']} ms, p99 {lv['p99_ms']} ms, "
              f"max {lv['max_ms']} ms ({lv['n']} calls)")
    print("\nissue figures:")
    for name, value, limit, met in r["figures"]:
        print(f"  {name:<58} {value!s:>10}  limit {limit:<8} {'met' if met else 'NOT MET'}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--settle", type=float, default=2.0, help="seconds of load before the first kill and "
                   "after each recovery")
    p.add_argument("--local-clients", type=int, default=4)
    p.add_argument("--grpc-clients", type=int, default=2)
    p.add_argument("--restart-backoff-ms", type=float, default=250.0, help="the server's (its default)")
    p.add_argument("--max-queue-size", type=int, default=16)
    p.add_argument("--bounded-layers", type=int, default=12, help=f"hidden 2048 x 2048 layers of {BOUNDED_MODEL}: "
                   "its cost per sample (fewer: a faster model, and more CPU for the clients to offer 10 x)")
    p.add_argument("--overload-seconds", type=float, default=5.0)
    p.add_argument("--overload-factor", type=float, default=10.0)
    p.add_argument("--overload-threads", type=int, default=8, help="threads per local client process (open loop)")
    p.add_argument("--grpc-rate", type=float, default=150.0, help="requests/s per gRPC client process, overload")
    p.add_argument("--model-weight", type=int, default=0,
                   help="kernelport.model_weight of the overloaded model (15..1024; 0: not set, nice 0)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    started = _dt.datetime.now(_dt.timezone.utc)
    json_path = args.json or os.path.join(HERE, "results", f"faults-{started:%Y%m%dT%H%M%SZ}.json")
    load_before = [round(x, 2) for x in os.getloadavg()]
    others = ForeignLoad()
    with tempfile.TemporaryDirectory(prefix="kp-faults-") as tmp:
        repo = os.path.join(tmp, "repo")
        build_repository(repo, args.max_queue_size, args.bounded_layers, args.model_weight)
        sock = os.path.join(tmp, "kp.sock")
        server = ServerProcess.with_ports(repo, sock, "--max-restarts", "1000", "--restart-backoff-ms",
                                          str(args.restart_backoff_ms), grpc=True)
        url = f"127.0.0.1:{server.grpc_port}"
        local = Clients("local", args.local_clients, sock, url, 1)
        grpc = Clients("grpc", args.grpc_clients, sock, url, 100)
        try:
            print("worker kills", file=sys.stderr, flush=True)
            kills = run_kills(args, sock, local, grpc)
            print("overload", file=sys.stderr, flush=True)
            overload = run_overload(args, local, grpc, url)
        finally:
            local.close()
            grpc.close()
            code = server.stop()
    rows = kills["kills"]

    def worst(values: list[Any]) -> float | None:
        values = [v for v in values if v is not None]
        return max(values) if values else None

    summary = {
        "max_last_answer_ms": {kind: worst([r[kind]["last_answer_ms"] for r in rows]) for kind in ("local", "grpc")},
        "held_requests": {kind: sum(r[kind]["held"] for r in rows) for kind in ("local", "grpc")},
        "max_ready_ms": worst([r["ready_ms"] for r in rows]),
        "max_ready_minus_backoff_ms": worst([None if r["ready_ms"] is None
                                             else round(r["ready_ms"] - r["backoff_ms"], 2) for r in rows]),
        "max_first_success_ms": worst([r[kind]["first_success_ms"] for r in rows for kind in ("local", "grpc")]),
    }
    o = overload["per_transport"]
    factor = overload["offered_vs_capacity"]
    figures = [
        ("worker kill: every held request answered (local), ms", summary["max_last_answer_ms"]["local"], 1000),
        ("worker kill: every held request answered (gRPC), ms", summary["max_last_answer_ms"]["grpc"], 1000),
        ("worker kill: ready again, ms", summary["max_ready_ms"], 10000),
        ("worker kill: first successful request, ms", summary["max_first_success_ms"], 10000),
        (f"{factor} x overload: rejection p99 (local), ms", o["local"]["rejection_latency"]["p99_ms"], 5),
        (f"{factor} x overload: rejection p99 (gRPC), ms", o["grpc"]["rejection_latency"]["p99_ms"], 5),
    ]
    result: dict[str, Any] = {
        "benchmark": "faults",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "git_commit": _git_commit()},
        "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
        "others_cpu": round(others.fraction() or 0.0, 3),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "kills": kills, "overload": overload, "summary": summary,
        "figures": [(n, v, lim, v is not None and v <= lim) for n, v, lim in figures],
        "server_exit_code": code,
    }
    print_report(result)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {json_path}")
    return 0 if code == 0 else 1


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


if __name__ == "__main__":
    raise SystemExit(main())
