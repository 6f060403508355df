"""Tenant fairness: a tenant flooding a model at 10x another's rate gets no more than its share of runs.

One served ONNX model (a chain of 256x256 MatMuls, about a millisecond a batch on this machine, one
instance) and two tenants of closed-loop local clients: "calm" with `--calm` clients and "flood" with ten
times as many. Three phases of `--duration` seconds each:

1. calm alone: its latency with the instance to itself;
2. flood + calm, labelled with their tenants (equal weights unless `--weights` says otherwise): the share
   of executed rows each tenant got (from the server's per-tenant counters) and calm's latency;
3. flood + calm with no tenant labels (one shared class, first come first served): the same figures from
   the clients' own counts, for comparison.

Prints a table and writes JSON (bench/results/fairness-<time>.json). Not a test: nothing is asserted.
    python3 bench/fairness.py [--duration 10] [--calm 2] [--weights flood:1,calm:1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kernelport import Client
from kernelport.server.process import ServerProcess

MODEL = "work"
DIM = 256
CHAIN = 48  # MatMuls per run: a batch takes longer than a client's wake-up, so a waiting tenant is back in time


def write_model(repo: str, weights: str, chain: int = CHAIN, max_batch: int = 8) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w = (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32)
    nodes, prev = [], "x"
    for i in range(chain):
        out = "y" if i == chain - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "w"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, MODEL, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", DIM])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    os.makedirs(os.path.join(repo, MODEL, "1"))
    onnx.save(model, os.path.join(repo, MODEL, "1", "model.onnx"))
    with open(os.path.join(repo, MODEL, "config.pbtxt"), "w") as f:
        f.write(f'name: "{MODEL}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch}\n'
                f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {DIM} ] }} ]\n'
                f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {DIM} ] }} ]\n'
                'dynamic_batching { max_queue_delay_microseconds: 0 }\n'
                f'parameters {{ key: "kernelport.tenant_weights" value: {{ string_value: "{weights}" }} }}\n')


def tenant_clients(socket_path: str, tenant: str, n: int, labelled: bool, warmup: float, duration: float,
                   conn: Any) -> None:
    """One process per tenant (so one tenant's clients never wait on the other's interpreter lock):
    `n` closed-loop client threads; sends back the latencies of the timed part and the error count."""
    x = np.ones((1, DIM), np.float32)
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    counting = threading.Event()
    stop = threading.Event()

    def loop() -> None:
        with Client(socket_path, tenant=tenant if labelled else None) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    c.infer(MODEL, {"x": x})
                except Exception:
                    with lock:
                        errors[0] += 1
                    continue
                if counting.is_set():
                    with lock:
                        lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    counting.set()
    time.sleep(duration)
    counting.clear()
    stop.set()
    for t in threads:
        t.join(30)
    conn.send((lat, errors[0]))


class Phase:
    """Closed-loop clients by tenant (a process each) for a fixed time; latencies and errors per tenant."""

    def __init__(self, socket_path: str, clients: dict[str, int], labelled: bool) -> None:
        self.socket_path = socket_path
        self.clients = clients
        self.labelled = labelled
        self.lat: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}

    def run(self, duration: float, warmup: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        procs = []
        for tenant, n in self.clients.items():
            parent, child = ctx.Pipe()
            p = ctx.Process(target=tenant_clients,
                            args=(self.socket_path, tenant, n, self.labelled, warmup, duration, child))
            p.start()
            procs.append((tenant, p, parent))
        for tenant, p, parent in procs:
            self.lat[tenant], self.errors[tenant] = parent.recv()
            p.join(30)


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e6, q)) if values else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="timed seconds per phase")
    p.add_argument("--warmup", type=float, default=1.0, help="untimed seconds before each phase")
    p.add_argument("--calm", type=int, default=2, help="clients of the calm tenant (the flood has 10x)")
    p.add_argument("--chain", type=int, default=CHAIN, help="256x256 MatMuls per run of the model")
    p.add_argument("--max-batch", type=int, default=8, help="max_batch_size of the model (1: a run per request)")
    p.add_argument("--weights", default="flood:1,calm:1", help="kernelport.tenant_weights of the model")
    p.add_argument("--json", help="where to write the JSON (default: bench/results/fairness-<time>.json)")
    args = p.parse_args(argv)
    clients = {"flood": 10 * args.calm, "calm": args.calm}
    weights = dict((k, int(v)) for k, v in (item.split(":") for item in args.weights.split(",")))
    fair = weights.get("flood", 1) / (weights.get("flood", 1) + weights.get("calm", 1))

    with tempfile.TemporaryDirectory() as tmp:
        repo = os.path.join(tmp, "repo")
        write_model(repo, args.weights, args.chain, args.max_batch)
        server = ServerProcess(repo, os.path.join(tmp, "kp.sock"))
        results: dict[str, Any] = {"clients": clients, "weights": weights, "fair_flood_share": fair,
                                   "duration_s": args.duration, "load_before": os.getloadavg()}
        try:
            alone = Phase(server.socket_path, {"calm": args.calm}, True)
            alone.run(args.duration, args.warmup)
            results["calm_alone"] = {"requests": len(alone.lat["calm"]), "p50_us": pct(alone.lat["calm"], 50),
                                     "p99_us": pct(alone.lat["calm"], 99)}
            with Client(server.socket_path) as c:
                before = c.tenant_counters(MODEL)
            shared = Phase(server.socket_path, clients, True)
            shared.run(args.duration, args.warmup)
            with Client(server.socket_path) as c:
                after = c.tenant_counters(MODEL)
            rows = {t: after.get(t, {}).get("rows", 0) - before.get(t, {}).get("rows", 0) for t in clients}
            runs = {t: after.get(t, {}).get("batches", 0) - before.get(t, {}).get("batches", 0) for t in clients}
            results["tenants"] = {
                "rows": rows, "flood_share": rows["flood"] / max(1, sum(rows.values())),
                "executions": runs, "flood_exec_share": runs["flood"] / max(1, sum(runs.values())),
                "calm_p50_us": pct(shared.lat["calm"], 50), "calm_p99_us": pct(shared.lat["calm"], 99),
                "requests": {t: len(v) for t, v in shared.lat.items()}, "errors": shared.errors}
            fifo = Phase(server.socket_path, clients, False)
            fifo.run(args.duration, args.warmup)
            done = {t: len(v) for t, v in fifo.lat.items()}
            results["fifo"] = {
                "requests": done, "flood_share": done["flood"] / max(1, sum(done.values())),
                "calm_p50_us": pct(fifo.lat["calm"], 50), "calm_p99_us": pct(fifo.lat["calm"], 99),
                "errors": fifo.errors}
        finally:
            server.stop()
    results["load_after"] = os.getloadavg()

    t, f, a = results["tenants"], results["fifo"], results["calm_alone"]
    print(f"flood {clients['flood']} clients vs calm {clients['calm']}, weights {args.weights} "
          f"(fair flood share {fair:.0%}); load {results['load_before'][0]:.1f} -> {results['load_after'][0]:.1f}")
    print(f"{'phase':<22}{'flood rows':>11}{'flood runs':>11}{'calm p50 us':>13}{'calm p99 us':>13}")
    print(f"{'calm alone':<22}{'-':>11}{'-':>11}{a['p50_us']:>13.0f}{a['p99_us']:>13.0f}")
    print(f"{'tenants (weighted)':<22}{t['flood_share']:>11.1%}{t['flood_exec_share']:>11.1%}"
          f"{t['calm_p50_us']:>13.0f}{t['calm_p99_us']:>13.0f}")
    print(f"{'no tenants (FIFO)':<22}{f['flood_share']:>11.1%}{'(mixed)':>11}"
          f"{f['calm_p50_us']:>13.0f}{f['calm_p99_us']:>13.0f}")
    print("flood rows: the flood's share of rows run (FIFO: of requests answered); flood runs: of batches run")
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     time.strftime("fairness-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
