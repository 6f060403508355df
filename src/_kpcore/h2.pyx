# cython: language_level=3
"""The native gRPC transport: HTTP/2 + gRPC framing in C (include/kp_h2.h), one epoll thread.

`H2Server` binds, runs its loop thread, and hands calls to Python: worker threads block in `next_call()`
(GIL released) for unary-request calls, one dispatcher thread in `next_event()` for streaming-call
starts, their messages, half-closes and cancellations. Any thread answers with `respond()` / `send()`,
which write to the socket directly under the connection's lock. Python owns the policy (which servicer
method runs, status codes, authentication); C owns the protocol and every bound on what a peer sends.
"""

import binascii

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, strerror

CALL = KP_H2_CALL
START = KP_H2_START
MSG = KP_H2_MSG
HALF_CLOSE = KP_H2_HALF_CLOSE
CANCEL = KP_H2_CANCEL
GZIP = KP_H2_ENC_GZIP
DEFLATE = KP_H2_ENC_DEFLATE


cdef object _metadata(const char *meta, uint32_t n):
    """The call's metadata as ((key, value), ...): str values, bytes for '-bin' keys (base64-decoded)."""
    cdef uint32_t off = 0, nlen, vlen
    out = []
    while off + 8 <= n:
        memcpy(&nlen, meta + off, 4)
        memcpy(&vlen, meta + off + 4, 4)
        key = meta[off + 8:off + 8 + nlen].decode("latin-1")
        raw = meta[off + 8 + nlen:off + 8 + nlen + vlen]
        if key.endswith("-bin"):
            try:
                value = binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))
            except (binascii.Error, ValueError):
                value = raw
        else:
            value = raw.decode("utf-8", "replace")
        out.append((key, value))
        off += 8 + nlen + vlen
    return tuple(out)


cdef class H2Server:
    """A bound HTTP/2 gRPC listener. `methods`: [(path, client_streaming)]; a call's method is its index."""

    def __cinit__(self, str host, int port, list methods, uint64_t max_message_bytes,
                  uint32_t max_header_list=16384, uint32_t max_streams=1024, int max_connections=1024):
        cdef int n = len(methods), err = 0, i
        cdef const char **paths = <const char **>malloc((n + 1) * sizeof(char *))
        cdef uint32_t *lens = <uint32_t *>malloc((n + 1) * sizeof(uint32_t))
        cdef uint8_t *streaming = <uint8_t *>malloc(n + 1)
        encoded = [path.encode("ascii") for path, _ in methods]
        self._methods = tuple(methods)
        self._admit = {}  # model -> the Doorbell the admission table points into (kept mapped)
        host_b = host.strip("[]").encode("ascii")
        try:
            if paths == NULL or lens == NULL or streaming == NULL:
                raise MemoryError()
            for i in range(n):
                paths[i] = PyBytes_AS_STRING(encoded[i])
                lens[i] = <uint32_t>PyBytes_GET_SIZE(encoded[i])
                streaming[i] = 1 if methods[i][1] else 0
            self.s = kp_h2_create(host_b, port, n, paths, lens, streaming, max_message_bytes, max_header_list,
                                  max_streams, max_connections, &err)
        finally:
            free(paths)
            free(lens)
            free(streaming)
        if self.s == NULL:
            if err > 0:
                raise OSError(err, f"cannot listen for gRPC on {host}:{port}: {strerror(err).decode()}")
            raise ValueError(f"cannot listen for gRPC on {host}:{port}: bad address or limits")

    def __dealloc__(self):
        if self.s != NULL:
            with nogil:
                kp_h2_free(self.s)
            self.s = NULL

    @property
    def port(self) -> int:
        return self.s.port

    def start(self) -> None:
        if kp_h2_start(self.s) != 0:
            raise OSError("cannot start the gRPC transport thread")

    def shutdown(self) -> None:
        """Stop accepting; GOAWAY to every peer. Calls in flight go on."""
        kp_h2_shutdown(self.s)

    def stop(self) -> None:
        """Close every connection (cancelling what is held) and wake every waiter with None."""
        with nogil:
            kp_h2_stop(self.s)

    def next_call(self):
        """(call_id, method, metadata, deadline or None, message bytes, compressed) of a unary-request
        call (compressed: 0, GZIP or DEFLATE); None when the server has stopped."""
        cdef kp_h2_item *it = kp_h2_try_next(self.s, KP_H2_Q_CALLS)
        if it == NULL:  # wait with the GIL released (only then: releasing it costs a hand-off)
            with nogil:
                it = kp_h2_next(self.s, KP_H2_Q_CALLS)
        if it == NULL:
            return None
        try:
            return (it.call_id, it.method, _metadata(it.meta, it.meta_len),
                    it.deadline if it.deadline > 0 else None,
                    PyBytes_FromStringAndSize(<char *>it.data, it.len) if it.data != NULL else b"",
                    it.compressed)
        finally:
            kp_h2_item_free(it)

    def next_event(self):
        """(kind, call_id, method, metadata, deadline, data, compressed) of a streaming call's event; None
        when stopped."""
        cdef kp_h2_item *it = kp_h2_try_next(self.s, KP_H2_Q_EVENTS)
        if it == NULL:
            with nogil:
                it = kp_h2_next(self.s, KP_H2_Q_EVENTS)
        if it == NULL:
            return None
        try:
            meta = _metadata(it.meta, it.meta_len) if it.meta != NULL else ()
            data = PyBytes_FromStringAndSize(<char *>it.data, it.len) if it.data != NULL else None
            return (it.kind, it.call_id, it.method, meta, it.deadline if it.deadline > 0 else None, data,
                    it.compressed)
        finally:
            kp_h2_item_free(it)

    def respond(self, uint64_t call_id, object data, int status, bytes message=b"") -> bool:
        """Answer a call: `data` (bytes) as its last response message unless None, then the status."""
        cdef const uint8_t *p = NULL
        cdef size_t n = 0
        cdef int has = data is not None, rc
        cdef const char *m = PyBytes_AS_STRING(message)
        cdef size_t mlen = PyBytes_GET_SIZE(message)
        if has:
            if not isinstance(data, bytes):
                data = bytes(data)
            p = <const uint8_t *>PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
        if n < 65536:  # a short copy and a non-blocking send: cheaper than handing the GIL to another thread
            rc = kp_h2_respond(self.s, call_id, p, n, has, status, m, mlen)
        else:
            with nogil:
                rc = kp_h2_respond(self.s, call_id, p, n, has, status, m, mlen)
        return rc == 1

    def send(self, uint64_t call_id, bytes data) -> int:
        """One message of a streaming response; the stream's unsent backlog in bytes, -1 when gone."""
        cdef size_t backlog = 0
        cdef int rc
        cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(data)
        cdef size_t n = PyBytes_GET_SIZE(data)
        if n < 65536:
            rc = kp_h2_send(self.s, call_id, p, n, &backlog)
        else:
            with nogil:
                rc = kp_h2_send(self.s, call_id, p, n, &backlog)
        return <long long>backlog if rc == 1 else -1

    def backlog(self, uint64_t call_id) -> int:
        """Bytes of a streaming response waiting for the peer's window; -1 when the call is gone."""
        return kp_h2_backlog(self.s, call_id)

    def consumed(self, uint64_t call_id, uint32_t nbytes) -> None:
        kp_h2_consumed(self.s, call_id, nbytes)

    def active(self, uint64_t call_id) -> bool:
        return kp_h2_active(self.s, call_id) == 1

    def peer(self, uint64_t call_id) -> str:
        cdef char buf[96]
        kp_h2_peer(self.s, call_id, buf, sizeof(buf))
        return buf.decode("ascii", "replace")

    def set_infer_method(self, int method):
        """Check calls of method index `method` (ModelInfer; -1: none) against the admission table."""
        kp_h2_set_infer_method(self.s, method)

    def set_admission(self, str model, doorbell=None):
        """Refuse ModelInfer for `model` on the loop thread while its doorbell says its queue is full
        (a `_kpcore.Doorbell`, kept referenced here while the table points into it); None removes the
        model. False when the table is full or the name too long."""
        name = model.encode("utf-8")
        cdef size_t address = 0 if doorbell is None else <size_t>doorbell.segment.address
        cdef int rc = kp_h2_set_admission(self.s, name, <uint32_t>len(name), <void *>address)
        # after the call no reader holds the old pointer (the table's lock): the old doorbell may go
        if doorbell is None or rc != 0:
            self._admit.pop(model, None)
        else:
            self._admit[model] = doorbell
        return rc == 0

    def admitted(self):
        """The models the admission table checks."""
        return sorted(self._admit)

    def stats(self) -> dict:
        return {"calls": self.s.calls_total, "cancels": self.s.cancels_total,
                "connections": self.s.conns_total, "protocol_errors": self.s.protocol_errors,
                "rejected": self.s.rejected_total}


cdef int _collect(void *arg, const char *name, uint32_t nlen, const char *value, uint32_t vlen) noexcept with gil:
    (<list>arg).append((PyBytes_FromStringAndSize(name, nlen), PyBytes_FromStringAndSize(value, vlen)))
    return 0


def huffman_decode(bytes data) -> bytes:
    """Decode an HPACK Huffman string (RFC 7541 5.2); ValueError on a coding error. For tests."""
    cdef size_t n = PyBytes_GET_SIZE(data)
    cdef size_t cap = n * 8 // 5 + 8
    cdef uint8_t *out = <uint8_t *>malloc(cap)
    cdef long m
    if out == NULL:
        raise MemoryError()
    try:
        kp_huff_init()
        m = kp_huff_decode(<const uint8_t *>PyBytes_AS_STRING(data), n, out, cap)
        if m < 0:
            raise ValueError("invalid Huffman string")
        return PyBytes_FromStringAndSize(<char *>out, m)
    finally:
        free(out)


class HpackError(ValueError):
    pass


cdef class HpackDecoder:
    """An HPACK decoder with its dynamic table, as one connection keeps it. For tests."""
    cdef kp_hpack_table *t

    def __cinit__(self):
        kp_huff_init()
        self.t = <kp_hpack_table *>malloc(sizeof(kp_hpack_table))
        if self.t == NULL:
            raise MemoryError()
        kp_hpack_table_init(self.t)

    def __dealloc__(self):
        if self.t != NULL:
            kp_hpack_table_free(self.t)
            free(self.t)

    def decode(self, bytes block) -> list:
        """The header list of one complete block, [(name, value)] as bytes; HpackError when invalid."""
        out = []
        rc = kp_hpack_decode(self.t, <const uint8_t *>PyBytes_AS_STRING(block), PyBytes_GET_SIZE(block),
                             _collect, <void *>out)
        if rc != 0:
            raise HpackError("invalid header block")
        return out
