"""GPU latency, side by side with the in-process floor on the same GPU, in one run (needs CUDA, torch, cupy).

    python bench/gpu_latency.py                       # table to stdout, JSON to bench/results/
    python bench/gpu_latency.py --iterations 500 --json /tmp/gpu.json

Rows (p50 and p99 of `--iterations` timed requests after `--warmup`, host clock around each request, which ends
with the result ready for the caller):
- mlp b1, floor: the TorchScript mlp called in this process on cuda:0, a device tensor in and out
  (`torch.cuda.synchronize()` after each call, so the result is there).
- mlp b1, floor from host: the same from a pinned host tensor, the result copied back to the host.
- mlp b1, torch CUDA client: `kernelport.Client` with a torch CUDA tensor in and out
  (`kernelport.gpu.tensors.infer_with_device_tensors`): the model is served by a torch worker on the GPU
  (KIND_GPU), its rows are in host shared memory, so the tensor goes to host and back. Figure: p50 minus the
  floor's (the issue's target: at most +30 us).
- mlp b1, numpy client: the same with host arrays; figure against the floor from host.
- 64 MiB identity, floor: `y = x.copy()` of a 64 MiB device tensor in this process.
- 64 MiB identity, device lane (copy form): the tensor copied into a device row that another process owns
  (mapped here once by CUDA IPC), that process's identity (a device-to-device copy into the output row) run
  on a signal over a pipe, the output read in place on the device: no host round trip. Figure: p50 / floor's
  (target: 1.2 x).
- 64 MiB identity, device lane (zero-copy form): the same without the copy in (the caller's tensor is the row).
The signalling of the device-lane rows is a pipe round trip, not the lane protocol's futex: a lane whose data
area is on the device is not wired into the worker's loop yet (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = SRC + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")

MIB64 = 64 << 20


def timed(fn: Callable[[], Any], warmup: int, iterations: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    lat = np.empty(iterations, np.int64)
    for i in range(iterations):
        t0 = time.perf_counter_ns()
        fn()
        lat[i] = time.perf_counter_ns() - t0
    p50, p99 = np.percentile(lat, [50, 99])
    return float(p50) / 1e3, float(p99) / 1e3


# -- the device-lane peer: owns the rows, runs the identity --------------------------------------------------------


def _lane_owner(conn: Any, nbytes: int) -> None:
    import cupy

    from kernelport.gpu.device_lane import DeviceAllocation

    alloc = DeviceAllocation(2 * nbytes)  # an input row and an output row
    conn.send_bytes(alloc.export().to_bytes())
    src = cupy.ndarray((nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(alloc.memory, 0))
    dst = cupy.ndarray((nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(alloc.memory, nbytes))
    stream = cupy.cuda.Stream(non_blocking=True)
    while conn.recv_bytes() != b"stop":
        with stream:
            dst[...] = src  # the "model": identity into the output row
        stream.synchronize()  # outputs complete before the done signal (docs/gpu.md, ordering)
        conn.send_bytes(b"d")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--big-iterations", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(f"no CUDA GPU visible to torch {torch.__version__}: nothing to measure", file=sys.stderr)
        return 2
    try:
        import cupy
    except ImportError:
        print("cupy is not installed: the device-lane rows need it", file=sys.stderr)
        return 2

    from kernelport import Client
    from kernelport.gpu.device_lane import open_mapped
    from kernelport.gpu.examples import mlp_reference, write_torch_mlp
    from kernelport.gpu.ipc import IpcMemHandle
    from kernelport.gpu.tensors import infer_with_device_tensors
    from kernelport.server.process import ServerProcess

    rows: list[dict[str, Any]] = []

    def row(name: str, p50: float, p99: float, iterations: int, floor: str = "", figure: str = "") -> None:
        rows.append({"row": name, "p50_us": round(p50, 1), "p99_us": round(p99, 1), "n": iterations,
                     "floor": floor, "figure": figure})
        print(f"  {name}: p50 {p50:.1f} us, p99 {p99:.1f} us {figure}", flush=True)

    it, wu = args.iterations, args.warmup
    tmp = tempfile.mkdtemp(prefix="kp-gpu-bench-")
    repo = os.path.join(tmp, "repo")
    write_torch_mlp(repo, "mlp_gpu")
    x_host = np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)

    # -- mlp floors
    module = torch.jit.load(os.path.join(repo, "mlp_gpu", "1", "model.pt"), map_location="cuda:0").eval()
    x_dev = torch.from_numpy(x_host).cuda()
    x_pin = torch.from_numpy(x_host).pin_memory()
    out_pin = torch.empty((1, 512), dtype=torch.float32).pin_memory()

    def floor_device() -> None:
        with torch.inference_mode():
            module(x_dev)
        torch.cuda.synchronize()

    def floor_host() -> None:
        with torch.inference_mode():
            out_pin.copy_(module(x_pin.to("cuda:0", non_blocking=True)), non_blocking=True)
        torch.cuda.synchronize()

    f_dev = timed(floor_device, wu, it)
    row("mlp b1, floor (in-process torch, device tensors)", *f_dev, it)
    f_host = timed(floor_host, wu, it)
    row("mlp b1, floor from host (pinned in, host out)", *f_host, it)

    # -- mlp through the server
    sock = os.path.join(tmp, "kp.sock")
    server = ServerProcess(repo, sock)
    failed = False
    try:
        with Client(sock) as client:
            got = client.infer("mlp_gpu", {"INPUT__0": x_host})["OUTPUT__0"]
            ref = mlp_reference(x_host)
            err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            if not err < 2e-3:
                print(f"mlp_gpu result is wrong: relative error {err:.2e}", file=sys.stderr)
                failed = True

            def client_cuda() -> None:
                infer_with_device_tensors(client, "mlp_gpu", {"INPUT__0": x_dev})["OUTPUT__0"]

            def client_numpy() -> None:
                client.infer("mlp_gpu", {"INPUT__0": x_host})

            c = timed(client_cuda, wu, it)
            row("mlp b1, torch CUDA client (rows on host)", *c, it, "floor",
                f"+{c[0] - f_dev[0]:.1f} us over the floor (target +30)")
            n = timed(client_numpy, wu, it)
            row("mlp b1, numpy client", *n, it, "floor from host", f"+{n[0] - f_host[0]:.1f} us over its floor")
    finally:
        code = server.stop()
        if code != 0:
            print(server.log(), file=sys.stderr)
            failed = True

    # -- 64 MiB through device-lane rows
    big_it = args.big_iterations
    x_big = cupy.random.randint(0, 255, MIB64, dtype=cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)

    def floor_big() -> None:
        with stream:
            x_big.copy()
        stream.synchronize()

    fb = timed(floor_big, 10, big_it)
    row("64 MiB identity, floor (in-process copy on the device)", *fb, big_it)

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    owner = ctx.Process(target=_lane_owner, args=(there, MIB64), daemon=True)
    owner.start()
    try:
        record = IpcMemHandle.from_bytes(here.recv_bytes())
        mapped = open_mapped(record)
        in_row = mapped.array(0, (MIB64,), np.uint8)
        out_row = mapped.array(MIB64, (MIB64,), np.uint8)

        def lane_copy() -> None:
            with stream:
                in_row[...] = x_big
            stream.synchronize()  # the bytes are on the device before the commit (docs/gpu.md)
            here.send_bytes(b"g")
            here.recv_bytes()

        def lane_zero_copy() -> None:
            here.send_bytes(b"g")
            here.recv_bytes()

        lane_copy()
        if not bool((out_row == x_big).all()):
            print("device lane identity returned other bytes", file=sys.stderr)
            failed = True
        lc = timed(lane_copy, 10, big_it)
        row("64 MiB identity, device lane (copy form)", *lc, big_it, "floor",
            f"{lc[0] / fb[0]:.2f} x floor (target 1.2)")
        lz = timed(lane_zero_copy, 10, big_it)
        row("64 MiB identity, device lane (zero-copy form)", *lz, big_it, "floor", f"{lz[0] / fb[0]:.2f} x floor")
        mapped.close()
    finally:
        here.send_bytes(b"stop")
        owner.join(10)

    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cupy": cupy.__version__,
              "python": platform.python_version(), "cpus": os.cpu_count(), "rows": rows, "failed": failed}
    path = args.json or os.path.join(HERE, "results", f"gpu_latency_{_dt.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['gpu']}, torch {torch.__version__}, cupy {cupy.__version__}  (JSON: {path})")
    print(f"{'row':<58} {'p50 us':>9} {'p99 us':>9}  figure")
    for r in rows:
        print(f"{r['row']:<58} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f}  {r['figure']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
