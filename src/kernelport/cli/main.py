"""The `kernelport` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _serve(args: argparse.Namespace) -> int:
    from kernelport.errors import KernelPortError
    from kernelport.server.models import ServerOptions
    from kernelport.server.server import serve_forever

    if args.examples:
        from kernelport.examples import build_example_repository

        names = build_example_repository(args.model_repository)
        logging.getLogger("kernelport").info("example models in %s: %s", args.model_repository, ", ".join(names))
    if args.load_model and args.model_control_mode != "explicit":
        print("kernelport: --load-model needs --model-control-mode explicit", file=sys.stderr)
        return 2
    if args.repository_poll_secs is not None and args.model_control_mode != "poll":
        print("kernelport: --repository-poll-secs needs --model-control-mode poll", file=sys.stderr)
        return 2
    if args.repository_poll_secs is not None and args.repository_poll_secs <= 0:
        print("kernelport: --repository-poll-secs must be > 0", file=sys.stderr)
        return 2
    options = ServerOptions(
        repository=os.path.abspath(args.model_repository),
        socket_path=os.path.abspath(args.socket),
        commit_timeout=args.commit_timeout_ms / 1000.0,
        lane_slots=args.lane_slots,
        max_lanes_per_model=args.max_lanes_per_model,
        max_restarts=args.max_restarts,
        exit_timeout=args.exit_timeout_secs,
        restart_backoff=args.restart_backoff_ms / 1000.0,
        log_level=args.log_level,
        allow_other_users=args.allow_other_users,
        model_control_mode=args.model_control_mode,
        load_models=tuple(args.load_model),
        poll_secs=args.repository_poll_secs if args.repository_poll_secs is not None else 15.0,
        preset=args.preset,
    )
    security: dict[str, str | None] = {}
    for proto in ("grpc", "http"):  # the same TLS and token options for each front end
        opts = {f"{proto}_{k}": getattr(args, f"{proto}_{k}") for k in ("tls_cert", "tls_key", "tls_client_ca",
                                                                          "token_file")}
        if getattr(args, f"{proto}_port") is None and any(v is not None for v in opts.values()):
            print(f"kernelport: the --{proto}-tls-* and --{proto}-token-file options need --{proto}-port",
                  file=sys.stderr)
            return 2
        security.update(opts)
    try:
        serve_forever(options, grpc_port=args.grpc_port, grpc_host=args.grpc_host,
                      allow_client_shm=args.allow_client_shm, http_port=args.http_port,
                      http_host=args.http_host, http_max_body_bytes=int(args.http_max_body_mb * (1 << 20)),
                      grpc_engine=args.grpc_engine, **security)
    except KernelPortError as e:
        print(f"kernelport: {e}", file=sys.stderr)
        return 2
    return 0


def _examples(args: argparse.Namespace) -> int:
    from kernelport.examples import build_example_repository

    names = build_example_repository(args.path, force=args.force)
    print(f"example models in {args.path}: {', '.join(names)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from kernelport.cli.status import run_status

    return run_status(args)


def _models(args: argparse.Namespace) -> int:
    from kernelport.cli.status import run_models

    return run_models(args)


def _bench(args: argparse.Namespace) -> int:
    from kernelport.cli.bench import run_bench

    return run_bench(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernelport", description="KernelPort inference server")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a model repository")
    s.add_argument("--model-repository", required=True, help="Triton-layout model repository")
    s.add_argument("--socket", default="/tmp/kernelport.sock", help="unix socket for local clients")
    s.add_argument("--examples", action="store_true", help="first write the bundled example models into the repository")
    s.add_argument("--grpc-port", type=int, default=None, help="serve gRPC (KServe v2) on this port")
    s.add_argument("--grpc-host", default="127.0.0.1")
    s.add_argument("--grpc-engine", choices=["native", "grpcio"], default=None,
                   help="the gRPC server: native (HTTP/2 in C, plaintext) or grpcio (Python grpcio; always used "
                        "with TLS); default: $KERNELPORT_GRPC_ENGINE, else native")
    s.add_argument("--allow-client-shm", action="store_true", help="let gRPC clients register shared memory")
    s.add_argument("--http-port", type=int, default=None,
                   help="serve HTTP/REST (KServe v2) and Prometheus /metrics on this port")
    s.add_argument("--http-host", default="127.0.0.1")
    s.add_argument("--http-max-body-mb", type=float, default=64.0,
                   help="largest HTTP request body accepted, in MiB (larger ones get 413)")
    s.add_argument("--grpc-tls-cert", metavar="FILE", help="serve gRPC over TLS only, with this PEM certificate chain")
    s.add_argument("--grpc-tls-key", metavar="FILE", help="the PEM private key of --grpc-tls-cert")
    s.add_argument("--grpc-tls-client-ca", metavar="FILE",
                   help="mutual TLS: require gRPC clients to present a certificate signed by this PEM CA bundle")
    s.add_argument("--grpc-token-file", metavar="FILE",
                   help="require 'authorization: Bearer <token>' gRPC metadata; the file holds 'group:token' "
                        "lines ('#' comments), group one of infer (ModelInfer, ModelStreamInfer), metadata "
                        "(server/model metadata, config, model ready, statistics, repository index), "
                        "repository (load/unload), shm (shared-memory register/unregister/status), health "
                        "(server live/ready, grpc.health), or '*' for every RPC; groups not listed stay open")
    s.add_argument("--http-tls-cert", metavar="FILE", help="serve HTTP over TLS only (HTTPS), with this PEM "
                                                         "certificate chain")
    s.add_argument("--http-tls-key", metavar="FILE", help="the PEM private key of --http-tls-cert")
    s.add_argument("--http-tls-client-ca", metavar="FILE",
                   help="mutual TLS: require HTTP clients to present a certificate signed by this PEM CA bundle")
    s.add_argument("--http-token-file", metavar="FILE",
                   help="require 'Authorization: Bearer <token>' on HTTP requests; the --grpc-token-file format "
                        "and groups: infer (POST .../infer), metadata (server and model metadata, config, model "
                        "ready, statistics, repository index, /metrics), repository (load/unload), health "
                        "(/v2/health/live, /v2/health/ready), or '*' for every path; groups not listed stay "
                        "open; a refused request gets 401 with a JSON error")
    s.add_argument("--model-control-mode", choices=["none", "poll", "explicit"], default=None,
                   help="none: load every model at start, refuse load/unload requests (Triton's default); "
                        "explicit: load only the --load-model ones at start, allow load/unload; poll: load every "
                        "model, rescan the repository every --repository-poll-secs (load new models, unload "
                        "removed ones, reload changed ones), refuse load/unload. Not given: load every model "
                        "AND allow load/unload (unlike Triton, whose default 'none' refuses them, so that "
                        "`kernelport models load/unload` works without a flag)")
    s.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="with --model-control-mode explicit: a model to load at start (repeatable; '*': all)")
    s.add_argument("--repository-poll-secs", type=float, default=None, metavar="N",
                   help="with --model-control-mode poll: seconds between rescans of the repository (default 15)")
    s.add_argument("--preset", choices=["latency", "throughput"], default=None,
                   help="batching and instance policy for every model: latency (no queue delay, batch what is "
                        "waiting, 1 instance, short client spin) or throughput (a 500 us window or the config's, "
                        "close at the largest preferred batch size or max_batch_size, 2 CPU instances); fields "
                        "the config states win, and a model's 'kernelport.preset' parameter wins over this")
    s.add_argument("--commit-timeout-ms", type=float, default=500.0,
                   help="how long a claimed row may stay uncommitted before its batch runs without it")
    s.add_argument("--lane-slots", type=int, default=8,
                   help="batch slots per lane (fewer for lanes of large tensors: at most 256 MiB a lane)")
    s.add_argument("--max-lanes-per-model", type=int, default=32,
                   help="distinct input shapes a model serves at once (idle ones are evicted)")
    s.add_argument("--exit-timeout-secs", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, how long requests in flight may take before they are failed")
    s.add_argument("--max-restarts", type=int, default=5,
                   help="worker crashes within a minute before a model is left unavailable")
    s.add_argument("--restart-backoff-ms", type=float, default=250.0,
                   help="delay before restarting a crashed worker, doubled after each crash (at most 8 s)")
    s.add_argument("--allow-other-users", action="store_true", help="accept local clients of any uid")
    s.add_argument("--log-level", default="INFO")
    s.set_defaults(func=_serve)

    st = sub.add_parser("status", help="a view of a running server: models, workers, batches, waits")
    st.add_argument("--socket", default="/tmp/kernelport.sock")
    st.add_argument("--watch", action="store_true", help="refresh until interrupted")
    st.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    st.set_defaults(func=_status)

    mo = sub.add_parser("models", help="list, load or unload models of a running server")
    mo.add_argument("action", choices=["list", "load", "unload"])
    mo.add_argument("name", nargs="?")
    mo.add_argument("--socket", default="/tmp/kernelport.sock")
    mo.set_defaults(func=_models)

    b = sub.add_parser("bench", help="latency and throughput of a served model (local, gRPC or HTTP path)")
    from kernelport.cli.bench import add_arguments as bench_arguments

    bench_arguments(b)
    b.set_defaults(func=_bench)

    e = sub.add_parser("examples", help="write the bundled example model repository")
    e.add_argument("path")
    e.add_argument("--force", action="store_true")
    e.set_defaults(func=_examples)

    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO"), format="%(asctime)s %(name)s %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
