"""The native gRPC engine: the HTTP/2 + gRPC transport in C (`_kpcore.h2`), the servicer in Python.

One C thread runs the sockets (accept, HTTP/2 framing, HPACK, flow control, message reassembly, every
bound on what a peer sends); see `src/_kpcore/include/kp_h2.h`. Python runs the same `InferenceServicer`
methods the grpcio engine runs, from the same handler table (`InferenceServicer.method_handlers`):

- `workers` threads block in `H2Server.next_call()` (GIL released) and each runs one unary-request call
  at a time (every RPC but ModelStreamInfer): interceptors (`auth.BearerTokenInterceptor`), the handler,
  then `respond()`, which writes to the socket from that thread. A response-streaming call (health Watch)
  holds its thread while it streams, as it does in grpcio's thread pool.
- One dispatcher thread takes the events in order: the start of a client-streaming call (ModelStreamInfer,
  run on the stream pool with a request iterator fed by the following events), its messages, its
  half-close, and the cancellation of any call (peer reset, deadline, lost connection), which runs the
  call's `add_callback` callbacks at once, as grpcio does on its polling thread.

What a handler sees of its context: `invocation_metadata()`, `time_remaining()`, `add_callback()`,
`is_active()`, `abort()` / `abort_with_status()`, `set_code()` / `set_details()`, `peer()`, `cancel()`.
Status codes and messages follow grpcio's: an unknown method is UNIMPLEMENTED, a handler that raises
anything but an abort is UNKNOWN ("Exception calling application: ..."), a request that does not parse
is INTERNAL. gzip and deflate requests are inflated here (zlib releases the GIL), bounded by the max
message bytes. TLS is not part of this engine: with TLS configured, `serve_grpc` uses grpcio.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc

from _kpcore.h2 import CANCEL, GZIP, HALF_CLOSE, MSG, START, H2Server

if TYPE_CHECKING:
    from kernelport.protocol.grpc_frontend import InferenceServicer

__all__ = ["NativeGrpcServer"]

log = logging.getLogger(__name__)

_END = object()        # the client half-closed its request stream
_CANCELLED = object()  # the call was cancelled
_EARLY_CANCELS = 4096  # cancellations remembered for calls not yet taken by a worker
# A streaming response waits while this much of it is unsent (the peer's window is closed).
_SEND_BACKLOG = 16 << 20
_MAX_HEADER_LIST = 16384  # grpcio's hard limit on request metadata
ADMISSION_REFRESH_S = 0.2  # how soon the loop thread's admission table follows a model's new doorbell


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _CallDetails(grpc.HandlerCallDetails):
    """What an interceptor sees of a call (grpcio's HandlerCallDetails)."""

    __slots__ = ("method", "invocation_metadata")

    def __init__(self, method: str, invocation_metadata: Any) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class _Context:
    """The ServicerContext of one call in the native engine."""

    __slots__ = ("_server", "call_id", "_metadata", "_deadline", "_callbacks", "_lock", "_active", "_code",
                 "_details", "requests")

    def __init__(self, server: NativeGrpcServer, call_id: int, metadata: Any, deadline: float | None) -> None:
        self._server = server
        self.call_id = call_id
        self._metadata = metadata
        self._deadline = deadline
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._active = True
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self.requests: queue.SimpleQueue[Any] | None = None

    # -- grpc.ServicerContext -----------------------------------------------------------------------

    def invocation_metadata(self) -> Any:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        return self._active

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if not self._active:
                return False
            self._callbacks.append(callback)
            return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs an error status, not OK")
        raise _Aborted(code, details)

    def abort_with_status(self, status: Any) -> None:
        self.abort(status.code, status.details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def peer(self) -> str:
        return self._server.h2.peer(self.call_id)

    def cancel(self) -> None:
        self._server.h2.respond(self.call_id, None, grpc.StatusCode.CANCELLED.value[0], b"Cancelled")
        self.end()

    # -- the engine's side --------------------------------------------------------------------------

    def end(self) -> None:
        """The call is over (answered, cancelled or lost): run the callbacks once."""
        with self._lock:
            if not self._active:
                return
            self._active = False
            callbacks, self._callbacks = self._callbacks, []
        if self.requests is not None:
            self.requests.put(_CANCELLED)
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("gRPC call callback failed")


def _status(code: grpc.StatusCode) -> int:
    return int(code.value[0])


def _message(details: str | None) -> bytes:
    return (details or "").encode("utf-8", "replace")


def _inflate(data: bytes, encoding: int, limit: int) -> bytes:
    """A gzip or deflate (zlib) request message, decompressed to at most `limit` bytes."""
    inflater = zlib.decompressobj(wbits=31 if encoding == GZIP else 15)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        raise _Aborted(grpc.StatusCode.INTERNAL, "the compressed message could not be decompressed") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise _Aborted(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"Received message larger than max (more than {limit} bytes decompressed)")
    if not inflater.eof:
        raise _Aborted(grpc.StatusCode.INTERNAL, "the compressed message is truncated")
    return out


class NativeGrpcServer:
    """The started native engine (the interface of `GrpcFrontendServer` that the server uses)."""

    def __init__(
        self,
        servicer: InferenceServicer,
        host: str,
        port: int,
        max_message_bytes: int,
        workers: int,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
    ) -> None:
        self.servicer = servicer
        self._max_message = max_message_bytes
        self._interceptors = tuple(interceptors)
        self._by_path: dict[str, grpc.RpcMethodHandler] = {}
        for service, methods in servicer.method_handlers().items():
            for name, handler in methods.items():
                self._by_path[f"/{service}/{name}"] = handler
        self._paths = list(self._by_path)
        self._handlers = [self._by_path[p] for p in self._paths]
        self.h2 = H2Server(host, port, [(p, self._by_path[p].request_streaming) for p in self._paths],
                           max_message_bytes, max_header_list=_MAX_HEADER_LIST)
        self.port = self.h2.port
        self._lock = threading.Condition()
        self._calls: dict[int, _Context] = {}
        self._early: dict[int, None] = {}
        self._unary_done = 0
        self._streams_open = 0
        self._stream_pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="kp-h2-stream")
        self._threads = [
            threading.Thread(target=self._serve_calls, name=f"kp-h2-{i}", daemon=True) for i in range(max(1, workers))
        ]
        self._threads.append(threading.Thread(target=self._dispatch, name="kp-h2-events", daemon=True))
        self._stopped = threading.Event()
        self._stopping = False
        # Admission on the loop thread: a ModelInfer for a model whose queue is full is refused there
        # (RESOURCE_EXHAUSTED, counted in the model's rejections) without waking a handler thread. Not
        # with interceptors: a refusal must never answer a call that has not been authenticated.
        self._admitted: dict[str, Any] = {}
        from kernelport.protocol.grpc_frontend import SERVICE_NAME  # that module imports this one

        infer = f"/{SERVICE_NAME}/ModelInfer"
        if not self._interceptors and infer in self._by_path and hasattr(servicer.dp, "admission_doorbells"):
            self.h2.set_infer_method(self._paths.index(infer))
            self._threads.append(threading.Thread(target=self._admission, name="kp-h2-admission", daemon=True))
        stats = getattr(servicer.dp, "frontend_stats", None)
        if isinstance(stats, list):
            stats.append(self.h2.stats)

    # -- grpc.Server-like surface --------------------------------------------------------------------

    def start(self) -> None:
        for t in self._threads:
            t.start()
        self.h2.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls at once (GOAWAY), let those in flight finish for `grace` seconds, then cancel
        the rest and release the servicer. Returns an event set when everything has stopped."""
        with self._lock:
            if self._stopping:
                return self._stopped
            self._stopping = True
        self.h2.shutdown()

        def finish() -> None:
            deadline = time.monotonic() + (grace or 0.0)
            with self._lock:
                while self._in_flight() and time.monotonic() < deadline:
                    self._lock.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            self.h2.stop()  # every waiting thread gets None; calls still running find their connection gone
            join_by = time.monotonic() + 5.0
            for t in self._threads:
                t.join(timeout=max(0.0, join_by - time.monotonic()))
            self._stream_pool.shutdown(wait=False, cancel_futures=True)
            self.servicer.close()
            self._stopped.set()

        threading.Thread(target=finish, name="kp-h2-stop", daemon=True).start()
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def _admission(self) -> None:
        """Keep the loop thread's admission table in step with the models (loaded, reloaded, unloaded,
        restarted: each time a new doorbell) every ADMISSION_REFRESH_S."""
        while not self._stopped.wait(ADMISSION_REFRESH_S) and not self._stopping:
            try:
                want = self.servicer.dp.admission_doorbells()
            except Exception:  # a model changing state meanwhile: the next round sees it settled
                log.debug("admission refresh failed", exc_info=True)
                continue
            for name in [n for n in self._admitted if n not in want]:
                self.h2.set_admission(name, None)
                del self._admitted[name]
            for name, bell in want.items():
                if self._admitted.get(name) is not bell and self.h2.set_admission(name, bell):
                    self._admitted[name] = bell

    def _in_flight(self) -> int:
        return int(self.h2.stats()["calls"]) - self._unary_done + self._streams_open

    # -- calls ---------------------------------------------------------------------------------------

    def _handler(self, method: int, metadata: Any) -> grpc.RpcMethodHandler | None:
        handler = self._handlers[method]
        if not self._interceptors:
            return handler
        interceptors = self._interceptors

        def at(i: int, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            if i == len(interceptors):
                return self._by_path.get(details.method)
            return interceptors[i].intercept_service(lambda d: at(i + 1, d), details)

        return at(0, _CallDetails(self._paths[method], metadata))

    def _register(self, ctx: _Context) -> None:
        with self._lock:
            self._calls[ctx.call_id] = ctx
            early = self._early.pop(ctx.call_id, 0) is None
        if early:
            ctx.end()

    def _serve_calls(self) -> None:
        h2 = self.h2
        while True:
            call = h2.next_call()
            if call is None:
                return
            call_id, method, metadata, deadline, data, compressed = call
            ctx = _Context(self, call_id, metadata, deadline)
            self._register(ctx)
            try:
                self._run_unary_request(ctx, method, data, compressed)
            except Exception:  # never lose the worker thread
                log.exception("gRPC native engine: call failed")
                h2.respond(call_id, None, _status(grpc.StatusCode.INTERNAL), b"internal error")
            finally:
                with self._lock:
                    self._calls.pop(call_id, None)
                    self._unary_done += 1
                    if self._stopping:
                        self._lock.notify_all()
                ctx.end()

    def _run_unary_request(self, ctx: _Context, method: int, data: bytes, compressed: int) -> None:
        h2 = self.h2
        call_id = ctx.call_id
        try:
            handler = self._handler(method, ctx.invocation_metadata())
            if handler is None:
                h2.respond(call_id, None, _status(grpc.StatusCode.UNIMPLEMENTED), b"Method not found!")
                return
            if compressed:
                data = _inflate(data, compressed, self._max_message)
            try:
                request = handler.request_deserializer(data) if handler.request_deserializer else data
            except Exception:
                h2.respond(call_id, None, _status(grpc.StatusCode.INTERNAL), b"Exception deserializing request!")
                return
            if handler.response_streaming:
                assert handler.unary_stream is not None
                self._send_all(ctx, handler.unary_stream(request, ctx), handler.response_serializer)
                return
            assert handler.unary_unary is not None
            response = handler.unary_unary(request, ctx)
            self._answer(ctx, response, handler.response_serializer)
        except _Aborted as a:
            h2.respond(call_id, None, _status(a.code), _message(a.details))
        except Exception as exc:
            log.exception("gRPC %s raised", self._paths[method])
            h2.respond(call_id, None, _status(grpc.StatusCode.UNKNOWN),
                       _message(f"Exception calling application: {exc}"))

    def _answer(self, ctx: _Context, response: Any, serializer: Callable[[Any], bytes] | None) -> None:
        code = ctx.code()
        if code is not None and code != grpc.StatusCode.OK:
            self.h2.respond(ctx.call_id, None, _status(code), _message(ctx.details()))
            return
        try:
            out = serializer(response) if serializer else response
        except Exception:
            log.exception("gRPC response could not be serialized")
            self.h2.respond(ctx.call_id, None, _status(grpc.StatusCode.INTERNAL), b"Failed to serialize response!")
            return
        self.h2.respond(ctx.call_id, out, 0, _message(ctx.details()))

    def _send_all(self, ctx: _Context, responses: Iterator[Any], serializer: Callable[[Any], bytes] | None) -> None:
        """Send each response as it is yielded, then OK; stops (closing the iterator) when the call ends."""
        h2 = self.h2
        try:
            for response in responses:
                backlog = h2.send(ctx.call_id, serializer(response) if serializer else response)
                if backlog < 0:
                    return  # the call is gone (cancelled, expired, disconnected)
                while backlog > _SEND_BACKLOG and ctx.is_active() and h2.active(ctx.call_id):
                    time.sleep(0.001)  # the peer's window is closed: hold the handler, not memory
                    backlog = h2.backlog(ctx.call_id)
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()
        code = ctx.code()
        if code is not None and code != grpc.StatusCode.OK:
            h2.respond(ctx.call_id, None, _status(code), _message(ctx.details()))
        else:
            h2.respond(ctx.call_id, None, 0, _message(ctx.details()))

    # -- streaming calls and cancellations -----------------------------------------------------------

    def _dispatch(self) -> None:
        h2 = self.h2
        while True:
            event = h2.next_event()
            if event is None:
                return
            kind, call_id, method, metadata, deadline, data, compressed = event
            if kind == START:
                ctx = _Context(self, call_id, metadata, deadline)
                ctx.requests = queue.SimpleQueue()
                with self._lock:
                    self._calls[call_id] = ctx
                    self._streams_open += 1
                try:
                    self._stream_pool.submit(self._run_streaming, ctx, method)
                except RuntimeError:  # stopping
                    self._stream_done(ctx)
                continue
            with self._lock:
                ctx = self._calls.get(call_id)  # type: ignore[assignment]
                if ctx is None and kind == CANCEL:
                    self._early[call_id] = None  # a worker has not registered it yet
                    if len(self._early) > _EARLY_CANCELS:
                        del self._early[next(iter(self._early))]
            if ctx is None:
                continue
            if kind == MSG and ctx.requests is not None:
                ctx.requests.put((data, compressed))
            elif kind == HALF_CLOSE and ctx.requests is not None:
                ctx.requests.put(_END)
            elif kind == CANCEL:
                ctx.end()

    def _stream_done(self, ctx: _Context) -> None:
        with self._lock:
            self._calls.pop(ctx.call_id, None)
            self._streams_open -= 1
            if self._stopping:
                self._lock.notify_all()
        ctx.end()

    def _run_streaming(self, ctx: _Context, method: int) -> None:
        h2 = self.h2
        try:
            handler = self._handler(method, ctx.invocation_metadata())
            if handler is None:
                h2.respond(ctx.call_id, None, _status(grpc.StatusCode.UNIMPLEMENTED), b"Method not found!")
                return
            deserialize = handler.request_deserializer
            requests = ctx.requests
            assert requests is not None

            def request_iterator() -> Iterator[Any]:
                while True:
                    item = requests.get()
                    if item is _END or item is _CANCELLED:
                        if item is _CANCELLED:
                            requests.put(_CANCELLED)  # every later read ends too
                        return
                    data, compressed = item
                    h2.consumed(ctx.call_id, len(data))
                    try:  # a bad message ends the call with its status (the servicer sees the stream end)
                        if compressed:
                            data = _inflate(data, compressed, self._max_message)
                        request = deserialize(data) if deserialize else data
                    except _Aborted as a:
                        h2.respond(ctx.call_id, None, _status(a.code), _message(a.details))
                        return
                    except Exception:
                        h2.respond(ctx.call_id, None, _status(grpc.StatusCode.INTERNAL),
                                   b"Exception deserializing request!")
                        return
                    yield request

            if handler.response_streaming:
                assert handler.stream_stream is not None
                self._send_all(ctx, handler.stream_stream(request_iterator(), ctx), handler.response_serializer)
            else:
                assert handler.stream_unary is not None
                self._answer(ctx, handler.stream_unary(request_iterator(), ctx), handler.response_serializer)
        except _Aborted as a:
            h2.respond(ctx.call_id, None, _status(a.code), _message(a.details))
        except Exception as exc:
            log.exception("gRPC %s raised", self._paths[method])
            h2.respond(ctx.call_id, None, _status(grpc.StatusCode.UNKNOWN),
                       _message(f"Exception calling application: {exc}"))
        finally:
            self._stream_done(ctx)
