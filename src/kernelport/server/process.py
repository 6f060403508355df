"""`kernelport serve` in a subprocess, for tests, benchmarks and scripts that need a real server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """Starts `kernelport serve --model-repository REPO --socket PATH [extra...]` and waits for its ready
    line; keeps its output (shown when it fails to start). `stop()` sends SIGTERM and returns the exit code."""

    grpc_port: int | None = None
    http_port: int | None = None

    @classmethod
    def with_ports(cls, repository: str, socket_path: str, *extra: str, grpc: bool = False, http: bool = False,
                   attempts: int = 3) -> ServerProcess:
        """A server that also listens for gRPC and/or HTTP on free ports (`.grpc_port`, `.http_port`). A port
        found free may be taken before the server binds it: a start that cannot listen is tried again."""
        for attempt in range(attempts):
            ports: list[str] = []
            grpc_port = free_port() if grpc else None
            http_port = free_port() if http else None
            if grpc_port is not None:
                ports += ["--grpc-port", str(grpc_port)]
            if http_port is not None:
                ports += ["--http-port", str(http_port)]
            try:
                server = cls(repository, socket_path, *ports, *extra)
            except RuntimeError as e:
                if "cannot listen" in str(e) and attempt < attempts - 1:
                    continue
                raise
            server.grpc_port, server.http_port = grpc_port, http_port
            return server
        raise AssertionError("unreachable")

    def __init__(self, repository: str, socket_path: str, *extra: str, start_timeout: float = 180.0) -> None:
        self.socket_path = socket_path
        self.lines: list[str] = []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernelport.cli.main", "serve", "--model-repository", repository,
             "--socket", socket_path, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if "ready on" in line:
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(start_timeout) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError("the server did not start:\n" + self.log())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit code (negative: killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._pump.join(5)
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
