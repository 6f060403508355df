"""The local socket's framing: a 4-byte length, a JSON object, and file descriptors alongside.

Every message is small (handshakes, lane announcements); tensors never cross the socket.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

MAX_MESSAGE_BYTES = 1 << 20
MAX_FDS = 8
_LEN = struct.Struct("<I")


class ConnectionClosed(ConnectionError):
    """The peer closed the socket."""


def send_msg(sock: socket.socket, obj: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE_BYTES:
        raise ValueError("message too large")
    data = _LEN.pack(len(body)) + body
    if fds:
        # the descriptors ride on the first byte; the rest follows as plain data
        sent = socket.send_fds(sock, [data], list(fds))
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < n:
        data, new_fds, _flags, _addr = socket.recv_fds(sock, n - got, MAX_FDS)
        fds.extend(new_fds)
        if not data:
            for fd in fds:
                _close_quietly(fd)
            raise ConnectionClosed("peer closed the connection")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    fds: list[int] = []
    (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size, fds))
    if length > MAX_MESSAGE_BYTES:
        for fd in fds:
            _close_quietly(fd)
        raise ValueError("message too large")
    body = _recv_exact(sock, length, fds)
    try:
        obj = json.loads(body)
    except ValueError:
        for fd in fds:
            _close_quietly(fd)
        raise
    if not isinstance(obj, dict):
        for fd in fds:
            _close_quietly(fd)
        raise ValueError("message is not an object")
    return obj, fds


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


__all__ = ["MAX_FDS", "ConnectionClosed", "recv_msg", "send_msg"]
