"""The local zero-copy client.

    with Client("/run/kernelport.sock") as c:
        out = c.infer("add_sub", {"INPUT0": a, "INPUT1": b})       # copies in and out

        with c.request("add_sub", batch=4) as req:                   # zero-copy form
            req.inputs["INPUT0"][:] = a                              # write straight into the rows
            req.inputs["INPUT1"][:] = b
            out = req.run()                                          # read-only views of the output rows
            use(out["OUTPUT0"])
        # leaving the block releases the rows

The socket carries only the handshake; requests go through the lanes in shared memory.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import _kpcore
from kernelport import errors as _errors
from kernelport.client.lanes import LaneLayout, LaneView, ModelInfo, check_outputs, lane_key, validate_inputs
from kernelport.errors import InvalidInputError, KernelPortError, ModelNotReadyError, ServerUnavailableError
from kernelport.server.wire import ConnectionClosed, recv_msg, send_msg

DEFAULT_TIMEOUT = 60.0


class _Model:
    def __init__(self, info: ModelInfo, doorbell: Any) -> None:
        self.info = info
        self.doorbell = doorbell
        self.lanes: dict[str, LaneView] = {}


DEFAULT_SPIN_US = 50.0  # how long a waiting client stays awake before it sleeps, unless told

class Client:
    """A local client of a KernelPort server, over its unix socket. Thread-safe."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT,
                 spin_microseconds: float | None = None, tenant: str | None = None) -> None:
        """`tenant`: the scheduling class this client's requests count against (models share a busy
        instance between tenants by weight); a request's own `tenant=` overrides it."""
        self.socket_path = socket_path
        self.tenant = tenant or ""
        self.timeout = timeout
        # None: the model's hint (config parameter kernelport.client_spin_microseconds, or a preset's),
        # else DEFAULT_SPIN_US
        self.spin = None if spin_microseconds is None else spin_microseconds / 1e6
        self._lock = threading.Lock()  # one handshake at a time on the socket
        self._models: dict[str, _Model] = {}
        self._closed = False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(socket_path)
            hello = self._call({"op": "hello"})[0]
        except OSError as e:
            self._sock.close()
            raise ServerUnavailableError(f"no KernelPort server at {socket_path}: {e.strerror or e}") from None
        self.owner = int(hello["owner"])

    # ---- plumbing ----

    def _call(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            if self._closed:
                raise ServerUnavailableError("client is closed")
            try:
                send_msg(self._sock, msg)
                reply, fds = recv_msg(self._sock)
            except (ConnectionClosed, OSError) as e:
                raise ServerUnavailableError(f"the server is gone ({e})") from None
        err = reply.get("error")
        if err is not None:
            for fd in fds:
                _close_fd(fd)
            cls = getattr(_errors, str(err.get("type")), KernelPortError)
            if not (isinstance(cls, type) and issubclass(cls, KernelPortError)):
                cls = KernelPortError
            raise cls(str(err.get("message")))
        return reply, fds

    def _check_alive(self) -> None:
        """Raise if the server closed our socket (it never writes unasked)."""
        try:
            r, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            raise ServerUnavailableError("the server is gone") from None
        if r:
            raise ServerUnavailableError("the server is gone")

    def _model(self, name: str) -> _Model:
        m = self._models.get(name)
        if m is not None:
            return m
        reply, fds = self._call({"op": "model", "model": name})
        try:
            info = ModelInfo.from_dict(reply["model"])
            seg = _kpcore.Segment.from_fd(fds.pop(0), int(reply["doorbell_size"]))
        finally:
            for fd in fds:
                _close_fd(fd)
        seg.close_fd()
        m = _Model(info, _kpcore.Doorbell(seg))
        self._models[name] = m
        return m

    def _lane(self, m: _Model, shapes: tuple[tuple[int, ...], ...], caps: tuple[int, ...] = (),
              level: int = 0, tenant: str = "") -> LaneView:
        key = lane_key(shapes, caps, f"{level}/{tenant}/")
        view = m.lanes.get(key)
        if view is not None:
            return view
        reply, fds = self._call({"op": "lane", "model": m.info.name, "shapes": [list(s) for s in shapes],
                                 "capacities": list(caps), "priority": level, "tenant": tenant})
        try:
            layout = LaneLayout.from_dict(reply["lane"])
            seg = _kpcore.Segment.from_fd(fds.pop(0), layout.size)
        finally:
            for fd in fds:
                _close_fd(fd)
        seg.close_fd()
        view = LaneView.attach(layout, seg, m.doorbell)
        hint = m.info.client_spin_us
        view.lane.set_spin(2000, self.spin if self.spin is not None else
                           (DEFAULT_SPIN_US if hint is None else hint) / 1e6)
        m.lanes[key] = view
        return view

    def _forget(self, name: str) -> None:
        self._models.pop(name, None)

    # ---- the API ----

    def model_ready(self, model: str) -> bool:
        return bool(self._call({"op": "ready", "model": model})[0]["ready"])

    def model_metadata(self, model: str) -> dict[str, Any]:
        return self._model(model).info.to_dict()

    def server_status(self) -> dict[str, Any]:
        """Every model's state, the reason when it is not ready, and its worker processes."""
        return dict(self._call({"op": "status"})[0]["models"])

    def repository_index(self) -> list[dict[str, str]]:
        """Every model of the repository: name, version, state and the reason when not ready."""
        return list(self._call({"op": "index"})[0]["models"])

    def load_model(self, model: str) -> None:
        """(Re)load a model from the repository."""
        self._forget(model)
        self._call({"op": "load", "model": model})

    def unload_model(self, model: str) -> None:
        self._forget(model)
        self._call({"op": "unload", "model": model})

    def counters(self, model: str) -> dict[str, int]:
        """The model's lane counters (claims, batches, rows, sleeps...), summed over its lanes."""
        return {k: int(v) for k, v in self._call({"op": "counters", "model": model})[0]["counters"].items()}

    def tenant_counters(self, model: str) -> dict[str, dict[str, int]]:
        """The model's lane counters by tenant ('' : requests without one, or beyond the model's max_tenants)."""
        got = self._call({"op": "counters", "model": model})[0]["tenants"]
        return {str(t): {k: int(v) for k, v in c.items()} for t, c in got.items()}

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
              timeout: float | None = None, queue_timeout: float | None = None, priority: int = 0,
              tenant: str | None = None) -> dict[str, np.ndarray]:
        """Run one request; returns a dict of output arrays (copies).

        `timeout`: seconds to wait for the result. `queue_timeout`: seconds the request may wait for
        its batch before it is dropped unrun, when the model's queue policy allows overriding its
        default_timeout_microseconds. `priority`: the level (1 runs first; 0 = the model's default)
        when the model has priority_levels. `tenant`: this request's tenant (default: the client's)."""
        m = self._model(model)
        n, shapes, arrays, caps = validate_inputs(m.info, inputs)
        if outputs is not None:
            check_outputs(m.info, outputs)
        tenant = self.tenant if tenant is None else tenant
        for attempt in (0, 1):
            level = m.info.level(priority)
            view = self._lane(m, shapes, caps, level, tenant)
            try:
                limit = self.timeout if timeout is None else timeout
                return view.run(self.owner, arrays, n, limit, model, outputs, self._check_alive,
                                m.info.queue_timeout(queue_timeout, level))
            except (_kpcore.LaneRetired, ModelNotReadyError):
                # the lane was retired or its worker restarted: ask once more
                self._forget(model)
                if attempt:
                    raise
                m = self._model(model)
        raise AssertionError("unreachable")

    def request(self, model: str, batch: int = 1, shapes: Mapping[str, Sequence[int]] | None = None,
                timeout: float | None = None, queue_timeout: float | None = None, priority: int = 0,
                tenant: str | None = None) -> InferRequest:
        """A zero-copy request: claim rows now, fill `req.inputs` in place, `req.run()`, read the
        outputs in place, and release by leaving the `with` block (or `req.release()`).

        `shapes` gives the per-sample shape of inputs whose config dims are variable."""
        m = self._model(model)
        info = m.info
        if any(t.is_bytes for t in info.inputs + info.outputs):
            raise InvalidInputError(f"model '{model}' has BYTES tensors: use infer(), which encodes them")
        if info.batching and not 1 <= batch <= info.max_batch_size:
            raise InvalidInputError(f"model '{model}': batch size {batch} is not in 1..{info.max_batch_size}")
        per: list[tuple[int, ...]] = []
        for t in info.inputs:
            s = tuple(int(d) for d in (shapes or {}).get(t.name, t.dims))
            if len(s) != len(t.dims) or any(d < 1 or (w >= 0 and w != d) for w, d in zip(t.dims, s)):
                raise InvalidInputError(
                    f"model '{model}' input '{t.name}': expected {t.describe(info.batching)}, got per-sample shape "
                    f"{list(s)}" + ("" if shapes else " (give `shapes` for variable dims)"))
            per.append(s)
        n = batch if info.batching else 1
        limit = self.timeout if timeout is None else timeout
        tenant = self.tenant if tenant is None else tenant
        for attempt in (0, 1):
            level = m.info.level(priority)
            view = self._lane(m, tuple(per), (), level, tenant)
            try:
                seq, row = view.claim(self.owner, n, limit, model, m.info.queue_timeout(queue_timeout, level))
            except (_kpcore.LaneRetired, ModelNotReadyError):
                self._forget(model)  # retired lane or restarted worker: ask once more
                if attempt:
                    raise
                m = self._model(model)
                continue
            return InferRequest(self, view, model, seq, row, n, limit)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sock.close()
        self._models.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InferRequest:
    """Rows claimed in a lane: writable input views until `run()`, read-only output views after."""

    def __init__(self, client: Client, view: LaneView, model: str, seq: int, row: int, n: int, timeout: float) -> None:
        self._client = client
        self._view = view
        self.model = model
        self._seq, self._row, self._n = seq, row, n
        self._timeout = timeout
        rows = view.rows(seq, row, n)
        k = view.layout.n_inputs
        self.inputs: dict[str, np.ndarray] = {t.name: a for t, a in zip(view.layout.tensors[:k], rows[:k])}
        self._out_rows = rows[k:]
        self.outputs: dict[str, np.ndarray] | None = None
        self._state = "claimed"  # -> "done" -> "released"

    def submit(self) -> None:
        """Hand the filled inputs to the server without waiting (the inputs stay readable; `run()`
        then waits for the outputs). Lets one thread queue several requests."""
        if self._state != "claimed":
            raise KernelPortError("request was already submitted" if self._state in ("submitted", "done")
                                  else "request was released")
        self._view.lane.commit(self._seq, self._row, self._n, self._client.owner)
        self._state = "submitted"

    @property
    def taken(self) -> bool:
        """Whether a worker has taken this request's batch (it runs now, or has run)."""
        return bool(self._view.lane.taken(self._seq))

    def run(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        if self._state not in ("claimed", "submitted"):
            raise KernelPortError("request already ran" if self._state == "done" else "request was released")
        v = self._view
        commit = self._state == "claimed"
        self._state = "committed"
        try:
            v.wait(self._seq, self._row, self._n, self._client.owner, timeout or self._timeout, self.model,
                   self._client._check_alive, commit=commit)
        except BaseException:
            self._state = "released"  # wait() released the rows before raising
            raise
        self._state = "done"
        outs: dict[str, np.ndarray] = {}
        for t, a in zip(v.layout.tensors[v.layout.n_inputs:], self._out_rows):
            ro = a.view()
            ro.flags.writeable = False
            outs[t.name] = ro
        for a in self.inputs.values():
            a.flags.writeable = False
        self.outputs = outs
        return outs

    def release(self) -> None:
        if self._state in ("claimed", "submitted", "done"):
            self._state = "released"
            try:
                self._view.lane.release(self._seq, self._row, self._n, self._client.owner)
            except _kpcore.LaneError:
                pass
        self.inputs = {}
        self.outputs = None
        self._out_rows = []

    def __enter__(self) -> InferRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AsyncClient:
    """The same surface for asyncio: each call runs the blocking path in a thread, where the waits
    release the GIL, so the event loop stays free."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @classmethod
    async def connect(cls, socket_path: str, timeout: float = DEFAULT_TIMEOUT,
                      tenant: str | None = None) -> AsyncClient:
        return cls(await asyncio.to_thread(Client, socket_path, timeout, None, tenant))

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
                    timeout: float | None = None, queue_timeout: float | None = None, priority: int = 0,
                    tenant: str | None = None) -> dict[str, np.ndarray]:
        return await asyncio.to_thread(self._client.infer, model, inputs, outputs, timeout, queue_timeout,
                                       priority, tenant)

    async def request(self, model: str, batch: int = 1, shapes: Mapping[str, Sequence[int]] | None = None,
                      timeout: float | None = None, queue_timeout: float | None = None, priority: int = 0,
                      tenant: str | None = None) -> AsyncInferRequest:
        req = await asyncio.to_thread(self._client.request, model, batch, shapes, timeout, queue_timeout,
                                      priority, tenant)
        return AsyncInferRequest(req)

    async def model_ready(self, model: str) -> bool:
        return await asyncio.to_thread(self._client.model_ready, model)

    async def model_metadata(self, model: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._client.model_metadata, model)

    async def close(self) -> None:
        self._client.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncInferRequest:
    def __init__(self, req: InferRequest) -> None:
        self._req = req

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        return self._req.inputs

    @property
    def outputs(self) -> dict[str, np.ndarray] | None:
        return self._req.outputs

    async def run(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        return await asyncio.to_thread(self._req.run, timeout)

    def release(self) -> None:
        self._req.release()

    async def __aenter__(self) -> AsyncInferRequest:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._req.release()


def _close_fd(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
