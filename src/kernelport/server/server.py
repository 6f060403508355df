"""The server process: model repository, workers, the local socket, and (when asked) gRPC.

The local socket carries only handshakes: a client says hello, asks for a model (it gets the model's
description and its doorbell) and for a lane per input shape (it gets the lane's layout and segment).
Tensors then go straight through the lanes. When a client's connection closes, every row it held
is given back.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import threading
from multiprocessing.connection import wait as wait_sentinels
from typing import Any

from kernelport.client.bytes_codec import MAX_CAPACITY, capacity_for
from kernelport.errors import InvalidInputError, KernelPortError, ServerUnavailableError
from kernelport.server.dataplane import DataPlane
from kernelport.server.models import ModelRuntime, ServerOptions
from kernelport.server.scheduling import check_tenant, parse_priority
from kernelport.server.wire import ConnectionClosed, recv_msg, send_msg

log = logging.getLogger("kernelport.server")

PROTOCOL_VERSION = 1


class Server:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.dataplane = DataPlane(options)
        self.sock: socket.socket | None = None
        self.stopping = threading.Event()
        self.next_owner = 2
        self.owner_lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self.grpc_server: Any = None
        self.http_server: Any = None  # kernelport.protocol.http_frontend.HttpFrontend

    # ---- lifecycle ----

    def start(self) -> None:
        self.dataplane.load_all()
        self._bind()
        t = threading.Thread(target=self._accept_loop, name="kp-accept", daemon=True)
        t.start()
        self.threads.append(t)
        m = threading.Thread(target=self._monitor_workers, name="kp-monitor", daemon=True)
        m.start()
        self.threads.append(m)
        if self.options.model_control_mode == "poll":
            p = threading.Thread(target=self._poll_repository, name="kp-poll", daemon=True)
            p.start()
            self.threads.append(p)

    def _poll_repository(self) -> None:
        """Poll mode: rescan the repository every poll_secs until the server stops."""
        while not self.stopping.wait(self.options.poll_secs):
            try:
                self.dataplane.poll_repository()
            except Exception:  # keep polling: a rescan that fails is reported and tried again
                log.exception("repository rescan failed")

    def _bind(self) -> None:
        path = self.options.socket_path
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise KernelPortError(f"socket path exists and is not a socket: {path}")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a server that is gone
            else:
                probe.close()
                raise KernelPortError(f"another server is listening on {path}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        s.listen(128)
        self.sock = s

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()  # local handshakes are refused from now on
        grpc_stopped = None
        if self.grpc_server is not None:  # new RPCs are refused; those in flight get the exit timeout
            grpc_stopped = self.grpc_server.stop(grace=self.options.exit_timeout)
        if self.http_server is not None:
            self.http_server.stop()
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            try:
                os.unlink(self.options.socket_path)
            except FileNotFoundError:
                pass
        left = self.dataplane.drain(self.options.exit_timeout)
        if left:
            log.warning("exit timeout: failing the requests still in flight on %d lane(s)", left)
        if self.http_server is not None:
            self.http_server.wait_idle(1.0)
        if grpc_stopped is not None:
            grpc_stopped.wait(1.0)
        self.dataplane.shutdown()
        for c in list(self.connections):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ---- workers ----

    def _monitor_workers(self) -> None:
        """Turn a worker that exits on its own into an error for exactly the requests it held."""
        while not self.stopping.is_set():
            watched = {}
            for rt in list(self.dataplane.models.values()):
                if rt.state != "READY":
                    continue
                for w in rt.workers:
                    watched[w.process.sentinel] = (rt, w)
            if not watched:
                self.stopping.wait(0.2)
                continue
            ready = wait_sentinels(list(watched), timeout=0.2)
            for sentinel in ready:
                rt, w = watched[sentinel]
                if not self.stopping.is_set() and rt.state == "READY" and w in rt.workers:
                    delay = rt.worker_died(w)
                    if delay is not None:
                        threading.Thread(target=self._restart, args=(rt, delay), name="kp-restart", daemon=True).start()

    def _restart(self, rt: ModelRuntime, delay: float) -> None:
        if self.stopping.wait(delay) or self.dataplane.models.get(rt.name) is not rt:
            return
        try:
            rt.restart()
        except KernelPortError as e:
            log.error("model '%s': restart failed: %s", rt.name, e)

    # ---- the local socket ----

    def _accept_loop(self) -> None:
        assert self.sock is not None
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self._peer_allowed(conn):
                conn.close()
                continue
            t = threading.Thread(target=self._serve_connection, args=(conn,), name="kp-conn", daemon=True)
            t.start()

    def _peer_allowed(self, conn: socket.socket) -> bool:
        if self.options.allow_other_users:
            return True
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            log.warning("refused a local client of uid %d", uid)
            return False
        return True

    def _new_owner(self) -> int:
        with self.owner_lock:
            owner = self.next_owner
            self.next_owner += 1
            return owner

    def _serve_connection(self, conn: socket.socket) -> None:
        self.connections.add(conn)
        owner = self._new_owner()
        models_used: set[str] = set()
        try:
            while True:
                try:
                    msg, fds = recv_msg(conn)
                except (ConnectionClosed, ConnectionError, OSError):
                    return
                except ValueError:
                    send_msg(conn, {"error": {"type": "InvalidInputError", "message": "malformed message"}})
                    continue
                for fd in fds:  # clients never send descriptors
                    os.close(fd)
                try:
                    reply, out_fds = self._handle(msg, owner, models_used)
                except KernelPortError as e:
                    reply, out_fds = {"error": {"type": type(e).__name__, "message": str(e)}}, []
                except Exception as e:  # keep serving: report, never crash the server
                    log.exception("local request failed")
                    reply, out_fds = {"error": {"type": "KernelPortError", "message": f"internal error: {e}"}}, []
                try:
                    send_msg(conn, reply, out_fds)
                finally:
                    for fd in out_fds:
                        os.close(fd)
        finally:
            self.connections.discard(conn)
            conn.close()
            for name in models_used:
                rt = self.dataplane.models.get(name)
                if rt is not None:
                    n = rt.reclaim(owner)
                    if n:
                        log.info("model '%s': reclaimed %d request(s) of a gone client", name, n)

    def _handle(self, msg: dict[str, Any], owner: int, models_used: set[str]) -> tuple[dict[str, Any], list[int]]:
        op = msg.get("op")
        dp = self.dataplane
        if self.stopping.is_set():
            raise ServerUnavailableError("the server is shutting down")
        if op == "hello":
            return {"owner": owner, "protocol": PROTOCOL_VERSION, "models": dp.model_names()}, []
        if op == "ready":
            return {"ready": dp.model_ready(str(msg.get("model", "")))}, []
        if op == "model":
            name = str(msg.get("model", ""))
            info = dp.model_info(name)
            rt = dp.models[name]
            models_used.add(name)
            return {"model": info.to_dict(), "doorbell_size": rt.doorbell.segment.size}, [rt.doorbell.segment.dup_fd()]
        if op == "lane":
            name = str(msg.get("model", ""))
            info = dp.model_info(name)
            shapes = msg.get("shapes")
            if not isinstance(shapes, list) or len(shapes) != len(info.inputs):
                raise InvalidInputError(f"model '{name}': lane request needs one shape per input")
            per_sample: list[tuple[int, ...]] = []
            for t, s in zip(info.inputs, shapes):
                if not isinstance(s, list) or len(s) != len(t.dims) or not all(isinstance(d, int) for d in s):
                    raise InvalidInputError(f"model '{name}' input '{t.name}': bad shape {s!r}")
                for want, got in zip(t.dims, s):
                    if got < 1 or got > (1 << 31) or (want >= 0 and want != got):
                        raise InvalidInputError(
                            f"model '{name}' input '{t.name}': expected {t.describe(info.batching)}, got {s}")
                per_sample.append(tuple(s))
            caps = msg.get("capacities") or [0] * len(info.inputs)
            if not isinstance(caps, list) or len(caps) != len(info.inputs):
                raise InvalidInputError(f"model '{name}': lane request needs one capacity per input")
            for t, cap in zip(info.inputs, caps):
                if not isinstance(cap, int) or (cap != 0) != t.is_bytes or (
                        t.is_bytes and (cap != capacity_for(cap) or cap > MAX_CAPACITY)):
                    raise InvalidInputError(f"model '{name}' input '{t.name}': bad element capacity {cap!r}")
            entry = dp.models[name].lane_for(tuple(per_sample), tuple(caps), parse_priority(msg.get("priority"), name),
                                             check_tenant(msg.get("tenant"), name))
            models_used.add(name)
            return {"lane": entry.layout.to_dict()}, [entry.segment.dup_fd()]
        if op == "status":
            return {"models": {
                name: {"state": rt.state, "reason": rt.reason, "workers": [w.process.pid for w in rt.workers]}
                for name, rt in list(dp.models.items())}}, []
        if op == "index":
            return {"models": [{"name": n, "version": v, "state": st, "reason": r}
                               for n, v, st, r in dp.repository_index()]}, []
        if op in ("load", "unload"):
            name = str(msg.get("model", ""))
            if op == "load":
                dp.load(name)
            else:
                dp.unload(name)
            return {"ok": True}, []
        if op == "counters":
            name = str(msg.get("model", ""))
            return {"counters": dp.counters(name), "tenants": dp.tenant_counters(name)}, []
        raise InvalidInputError(f"unknown request {op!r}")


def serve_forever(options: ServerOptions, grpc_port: int | None = None, grpc_host: str = "127.0.0.1",
                  allow_client_shm: bool = False, *, grpc_tls_cert: str | None = None,
                  grpc_tls_key: str | None = None, grpc_tls_client_ca: str | None = None,
                  grpc_token_file: str | None = None, http_port: int | None = None,
                  http_host: str = "127.0.0.1", http_max_body_bytes: int | None = None,
                  http_tls_cert: str | None = None, http_tls_key: str | None = None,
                  http_tls_client_ca: str | None = None, http_token_file: str | None = None,
                  grpc_engine: str | None = None) -> None:
    """Run until SIGINT/SIGTERM; then shut down cleanly.

    The gRPC TLS files and token file (`kernelport.protocol.auth`) are read before anything starts, so a
    bad one fails with a ConfigError at once.
    """
    import signal

    grpc_security: dict[str, Any] = {}
    if grpc_port is not None:
        from kernelport.protocol import auth

        tls = auth.read_tls_files(grpc_tls_cert, grpc_tls_key, grpc_tls_client_ca)
        if tls is not None:
            grpc_security["credentials"] = auth.server_credentials(tls)
        if grpc_token_file is not None:
            table = auth.TokenTable.from_file(grpc_token_file)
            grpc_security["interceptors"] = [auth.BearerTokenInterceptor(table)]
            log.info("gRPC bearer tokens required for: %s", ", ".join(table.protected_groups))
    http_security: dict[str, Any] = {}
    if http_port is not None:
        from kernelport.protocol import auth

        if http_tls_cert is not None or http_tls_key is not None or http_tls_client_ca is not None:
            if http_tls_cert is None or http_tls_key is None:
                raise KernelPortError("HTTP TLS needs both --http-tls-cert and --http-tls-key")
            http_security["ssl_context"] = auth.server_ssl_context(http_tls_cert, http_tls_key, http_tls_client_ca)
        if http_token_file is not None:
            http_security["tokens"] = auth.TokenTable.from_file(http_token_file)
    server = Server(options)
    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
        if grpc_port is not None:
            from kernelport.protocol.grpc_frontend import serve_grpc

            server.grpc_server = serve_grpc(server.dataplane, host=grpc_host, port=grpc_port,
                                            allow_client_shm=allow_client_shm, engine=grpc_engine,
                                            **grpc_security)
            log.info("gRPC (KServe v2) on %s:%d", grpc_host, grpc_port)
        if http_port is not None:
            from kernelport.protocol.http_frontend import DEFAULT_MAX_BODY_BYTES, serve_http

            server.http_server = serve_http(server.dataplane, host=http_host, port=http_port,
                                            max_body_bytes=http_max_body_bytes or DEFAULT_MAX_BODY_BYTES,
                                            **http_security)
        names = server.dataplane.model_names()
        log.info("serving %d model(s) on %s: %s", len(names), options.socket_path, ", ".join(names))
        print(_how_to_call(server, options.socket_path, grpc_host, grpc_port), flush=True)
        if server.http_server is not None:
            print(server.http_server.how_to_call(), flush=True)
        print(f"kernelport: ready on {options.socket_path}", flush=True)
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
        log.info("stopped")


def _how_to_call(server: Server, socket_path: str, grpc_host: str, grpc_port: int | None) -> str:
    """What a user needs to call the first ready model, printed once at start."""
    dp = server.dataplane
    ready = [n for n in dp.model_names() if dp.model_ready(n)]
    lines = [f"kernelport: {len(ready)} model(s) ready: {', '.join(ready) or 'none'}"]
    if ready:
        info = dp.model_info(ready[0])
        feeds = []
        for t in info.inputs:
            shape = ([1] if info.batching else []) + [d if d > 0 else 1 for d in t.dims]
            dtype = "object" if t.is_bytes else f"np.{t.dtype.name}"
            feeds.append(f'"{t.name}": np.zeros({tuple(shape)}, {dtype})')
        lines += [
            "call it from Python:",
            "    import numpy as np",
            "    from kernelport import Client",
            f"    with Client({socket_path!r}) as c:",
            f"        print(c.infer({ready[0]!r}, {{{', '.join(feeds)}}}))",
        ]
    if grpc_port is not None:
        lines.append(f"or over gRPC (KServe v2, tritonclient): {grpc_host}:{grpc_port}")
    return "\n".join(lines)
