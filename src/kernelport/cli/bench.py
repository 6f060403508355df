"""`kernelport bench`: latency and throughput of one served model, on one path, from this machine.

    kernelport bench -m add_sub                                   # local zero-copy, /tmp/kernelport.sock
    kernelport bench -m add_sub --grpc 127.0.0.1:8001 -c 4 -d 10   # 4 client processes for 10 s over gRPC
    kernelport bench -m mlp --http 127.0.0.1:8000 -n 5000 --plot mlp.html --json mlp.json

It prints a progress bar on stderr (a line per tenth of the run when stderr is not a terminal), then a
summary table on stdout: successful requests, failed ones by kind, throughput and latency percentiles.
With a gRPC or HTTP address it also reads the model's server-side statistics before and after the timed
requests; with the local socket, the model's lane counters. `--plot` writes a histogram and a percentile
curve (`.html`: a page with an inline SVG chart; `.png`: the same chart as an image), `--json` everything
(`-`: to stdout, the table then goes to stderr).

Exit status: 0 when every timed request succeeded, 1 when some failed, 2 when the run could not start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # the measuring modules are imported when a benchmark runs, not when the CLI starts
    from kernelport.benchmark.measure import Summary
    from kernelport.benchmark.requesters import Target

PATHS = ("local-copy", "local-zero-copy", "grpc", "grpc-shm", "http")
DEFAULT_SOCKET = "/tmp/kernelport.sock"
DEFAULT_REQUESTS = 1000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="the served model to measure")
    p.add_argument("--socket", default=None, help=f"the server's unix socket, for the local paths "
                                                  f"(default {DEFAULT_SOCKET})")
    p.add_argument("--grpc", metavar="HOST:PORT", default=None, help="the server's gRPC address (paths grpc, grpc-shm)")
    p.add_argument("--http", metavar="HOST:PORT", default=None, help="the server's HTTP address (path http)")
    p.add_argument("--path", choices=PATHS, default=None,
                   help="how requests are sent: local-copy (Client.infer), local-zero-copy (Client.request, "
                        "inputs written into the rows), grpc (tritonclient.grpc, tensors in the messages), "
                        "grpc-shm (system shared memory), http (tritonclient.http, binary tensors). Default: "
                        "http with --http, grpc with --grpc, else local-zero-copy (local-copy for a model with "
                        "BYTES inputs)")
    p.add_argument("-c", "--concurrency", type=int, default=1,
                   help="clients sending requests at once (1: a thread of this process; more: client processes)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-n", "--requests", type=int, default=None,
                   help=f"timed requests in all, shared by the clients (default {DEFAULT_REQUESTS})")
    g.add_argument("-d", "--duration", type=float, default=None, help="seconds of timed requests, instead of a count")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests per client first (default 20)")
    p.add_argument("-b", "--batch", type=int, default=1, help="samples per request (models that batch)")
    p.add_argument("--shape", action="append", default=[], metavar="INPUT=D,D,...",
                   help="the per-sample shape of an input with variable dims (repeatable)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take before it fails")
    p.add_argument("--token", default=None, help="bearer token for the remote paths (or $KERNELPORT_TOKEN)")
    p.add_argument("--tls-ca", metavar="FILE", default=None, help="remote paths over TLS, trusting this CA bundle")
    p.add_argument("--tls-cert", metavar="FILE", default=None, help="mutual TLS: the client certificate")
    p.add_argument("--tls-key", metavar="FILE", default=None, help="mutual TLS: the client certificate's key")
    p.add_argument("--plot", action="append", default=[], metavar="FILE.html|FILE.png",
                   help="write the latency histogram and percentile curve (repeatable)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON ('-': stdout)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random inputs")


def _fail(message: str) -> int:
    print(f"kernelport bench: {message}", file=sys.stderr)
    return 2


def _shapes(specs: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            raise ValueError(f"--shape {spec!r}: expected INPUT=D,D,... (integers)") from None
    return out


class Progress:
    """A progress bar on a terminal (redrawn in place), or a plain line per tenth of the run otherwise."""

    def __init__(self, stream: TextIO, total: int | None, duration: float | None) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.total, self.duration = total, duration
        self.next_tenth = 1
        self.last_draw = 0.0

    def fraction(self, done: int, elapsed: float) -> float:
        if self.total:
            return min(1.0, done / self.total)
        return min(1.0, elapsed / self.duration) if self.duration else 0.0

    def update(self, done: int, elapsed: float) -> None:
        frac = self.fraction(done, elapsed)
        rate = done / elapsed if elapsed > 0 else 0.0
        what = f"{done}/{self.total} requests" if self.total else f"{min(elapsed, self.duration or 0):.1f}/" \
               f"{self.duration:g} s, {done} requests"
        if self.tty:
            now = time.monotonic()
            if now - self.last_draw < 0.1 and frac < 1.0:
                return
            self.last_draw = now
            width = 30
            fill = int(frac * width)
            self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}%  {what}  "
                              f"{rate:,.0f} req/s\x1b[K")
            self.stream.flush()
            return
        tenth = int(frac * 10 + 1e-9)
        if tenth >= self.next_tenth:
            self.stream.write(f"bench: {tenth * 10}% ({what}, {rate:,.0f} req/s)\n")
            self.stream.flush()
            self.next_tenth = tenth + 1

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def format_table(s: Summary) -> str:
    head = ("path", "conc", "batch", "count", "errors", "req/s", "infer/s", "p50 us", "p90 us", "p99 us", "max us")
    row = (s.path, str(s.concurrency), str(s.batch), str(s.count), str(sum(s.errors.values())),
           f"{s.throughput_rps:,.1f}", f"{s.throughput_ips:,.1f}", f"{s.p50_us:.1f}", f"{s.p90_us:.1f}",
           f"{s.p99_us:.1f}", f"{s.max_us:.1f}")
    widths = [max(len(a), len(b)) for a, b in zip(head, row)]
    lines = [f"model {s.model} on {s.target}: {s.count} timed requests in {s.elapsed_s:.2f} s "
             f"after {s.warmup} warm-up request(s) per client",
             "  ".join(h.rjust(w) if i > 0 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))),
             "  ".join(c.rjust(w) if i > 0 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))]
    for kind, n in sorted(s.errors.items()):
        lines.append(f"errors: {kind}: {n}")
    if s.server:
        d = s.server
        if "success" in d:
            mean = f", mean batch {d['inference_count'] / d['execution_count']:.2f}" if d.get("execution_count") else ""
            lines.append(f"server statistics over the timed requests: {d['success']} successful, {d['fail']} "
                         f"failed requests; {d['inference_count']} inferences in {d['execution_count']} "
                         f"executions{mean}")
        else:
            mean = f", mean batch {d['rows'] / d['batches']:.2f}" if d.get("batches") else ""
            lines.append(f"lane counters over the timed requests: {d.get('claims', 0)} claims, "
                         f"{d.get('batches', 0)} batches{mean}")
    lines.extend(s.notes)
    return "\n".join(lines)


def _statistics_reader(args: argparse.Namespace, target: Target) -> tuple[Callable[[], dict[str, int]] | None,
                                                                          Callable[[], None]]:
    """A reader of the model's server-side figures (ModelStatistics over gRPC or HTTP, else the lane
    counters over the local socket), and its close."""
    from kernelport.benchmark.requesters import GrpcStatistics, HttpStatistics

    if target.grpc_url is not None:
        reader: Any = GrpcStatistics(target)
        return (lambda: reader.read(args.model)), reader.close
    if target.http_url is not None:
        reader = HttpStatistics(target)
        return (lambda: reader.read(args.model)), reader.close
    if target.socket_path is not None:
        from kernelport.client.client import Client

        client = Client(target.socket_path, timeout=target.timeout_s)
        keep = ("claims", "batches", "rows")
        return (lambda: {k: v for k, v in client.counters(args.model).items() if k in keep}), client.close
    return None, lambda: None


def run_bench(args: argparse.Namespace) -> int:
    from kernelport.benchmark.measure import ClientJob, run_clients, server_delta, summarize
    from kernelport.benchmark.requesters import Target, make_inputs, model_info

    path = args.path or ("http" if args.http else "grpc" if args.grpc else "local-zero-copy")
    if args.concurrency < 1 or args.batch < 1 or args.warmup < 0 or args.timeout <= 0:
        return _fail("--concurrency and --batch must be at least 1, --warmup at least 0, --timeout > 0")
    if args.requests is not None and args.requests < 1:
        return _fail("--requests must be at least 1")
    if args.duration is not None and args.duration <= 0:
        return _fail("--duration must be > 0")
    if path.startswith("grpc") and not args.grpc:
        return _fail(f"path {path} needs --grpc HOST:PORT")
    if path == "http" and not args.http:
        return _fail("path http needs --http HOST:PORT")
    for f in (args.tls_ca, args.tls_cert, args.tls_key):
        if f is not None and not os.path.isfile(f):
            return _fail(f"no such file: {f}")
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_cert is not None and args.tls_ca is None):
        return _fail("mutual TLS needs --tls-ca, --tls-cert and --tls-key")
    for plot in args.plot:
        if not plot.lower().endswith((".html", ".htm", ".png")):
            return _fail(f"--plot {plot}: the file name must end in .html or .png")
    local = path.startswith("local")
    socket_path = args.socket or (DEFAULT_SOCKET if local else None)
    token = args.token or os.environ.get("KERNELPORT_TOKEN")
    target = Target(socket_path=os.path.abspath(socket_path) if socket_path else None, timeout_s=args.timeout,
                    grpc_url=args.grpc, http_url=args.http,
                    headers=(("authorization", f"Bearer {token}"),) if token else (),
                    tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)
    where = {"grpc": args.grpc, "grpc-shm": args.grpc, "http": args.http}.get(path, socket_path)
    label = f"{path} ({where})"
    try:
        info = model_info(target, path, args.model)
        batched = int(info["max_batch_size"]) > 0
        if batched and args.batch > int(info["max_batch_size"]):
            return _fail(f"model '{args.model}': --batch {args.batch} is over its max_batch_size "
                         f"{info['max_batch_size']}")
        if not batched and args.batch != 1:
            return _fail(f"model '{args.model}' does not batch: --batch must be 1")
        inputs = make_inputs(info, args.batch, args.seed, _shapes(args.shape))
        if args.path is None and path == "local-zero-copy" and any(a.dtype == object for a in inputs.values()):
            path, label = "local-copy", f"local-copy ({socket_path})"  # BYTES: the copy form serves them
    except Exception as e:  # noqa: BLE001 (the CLI reports any failure to reach the model)
        return _fail(f"{label}: {e}")
    requests = args.requests if args.requests is not None or args.duration is not None else DEFAULT_REQUESTS
    job = ClientJob(path, args.model, inputs, requests, args.duration, args.warmup)
    print(f"kernelport bench: model {args.model} over {label}, {args.concurrency} client(s), "
          + (f"{requests} requests" if requests is not None else f"{args.duration:g} s")
          + f", batch {args.batch}, {args.warmup} warm-up request(s) per client", file=sys.stderr, flush=True)
    try:
        read_stats, close_stats = _statistics_reader(args, target)
    except Exception as e:  # noqa: BLE001
        return _fail(f"{label}: cannot read the model's statistics: {e}")
    before: dict[str, int] = {}

    def at_start() -> None:
        if read_stats is not None:
            before.update(read_stats())

    progress = Progress(sys.stderr, requests, args.duration)
    try:
        try:
            results = run_clients(job, target, args.concurrency, at_start=at_start, on_progress=progress.update)
        finally:
            progress.close()
        summary = summarize(results, model=args.model, path=path, target=label, batch=args.batch,
                            warmup=args.warmup)
        if read_stats is not None and before:
            summary.server = server_delta(before, read_stats())
    except Exception as e:  # noqa: BLE001
        return _fail(f"{label}: {e}")
    finally:
        close_stats()
    doc = summary.to_json()
    to_stdout_json = args.json == "-"
    print(format_table(summary), file=sys.stderr if to_stdout_json else sys.stdout, flush=True)
    if args.json is not None:
        from kernelport.benchmark.plot import chart_series

        doc["series"] = chart_series(summary.latencies_ns)
        text = json.dumps(doc, indent=1)
        if to_stdout_json:
            print(text, flush=True)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    if args.plot:
        from kernelport.benchmark.plot import write_plot

        title = f"{args.model} over {path}, concurrency {args.concurrency}, batch {args.batch}"
        table = {k: v for k, v in doc.items() if k not in ("series", "notes")}
        for plot in args.plot:
            write_plot(plot, summary.latencies_ns, table, title)
            print(f"kernelport bench: wrote {plot}", file=sys.stderr)
    if summary.count == 0:
        return 1
    return 1 if summary.errors else 0

