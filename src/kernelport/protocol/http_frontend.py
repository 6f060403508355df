"""The HTTP/REST front end: KServe v2 (Triton's HTTP protocol) and Prometheus `/metrics`, over a DataPlane.

Standard library only (`http.server.ThreadingHTTPServer`, HTTP/1.1 keep-alive, one thread per connection).
Like the gRPC front end it only translates the wire: models, batching and statistics are the data plane's
(docs/internals.md); the tensor byte rules (sizes, the BYTES element encoding) are the gRPC front end's own
helpers, so both transports accept and produce the same bytes.

Endpoints (`{v}`: every `/v2/models/{m}/...` path also takes the `/v2/models/{m}/versions/{v}/...` form):

    GET  /metrics                       Prometheus text (kernelport.metrics)
    GET  /v2                            server metadata
    GET  /v2/health/live                200, or 400 once the front end is stopping
    GET  /v2/health/ready               200 when every model meant to be served is ready, else 400
    GET  /v2/models/stats               statistics of every model
    GET  /v2/models/{m}                 model metadata
    GET  /v2/models/{m}/ready           200 when ready, else 400 (unknown models too)
    GET  /v2/models/{m}/config          the model configuration (ModelConfig as JSON, proto field names)
    GET  /v2/models/{m}/stats           statistics, Triton's JSON shape
    POST /v2/models/{m}/infer           inference: JSON tensors and the binary tensor extension
    POST /v2/repository/index           [{name, version, state, reason}]; body {"ready": true} lists ready ones
    POST /v2/repository/models/{m}/load     (re)load a model; "config" / "file:" parameters answer 501
    POST /v2/repository/models/{m}/unload

Health answers carry no body: 200 means true and 400 false, as Triton's HTTP server does (the protocol
asks for "a 4xx status"). Errors are `{"error": "<message>"}` with Triton's status codes: 400 invalid
request, 404 unknown model or version, 503 not ready / unavailable / queue full / timed out (Triton reports
its timeouts as UNAVAILABLE), 501 unsupported, 500 internal (logged; the message names no internals),
405 wrong method, 411 no Content-Length, 413 body over the limit, 415 unknown Content-Encoding.

Inference request (Triton's rules):
- `inputs: [{name, shape, datatype, parameters?, data?}]`; `data` is the tensor in row-major order, flat or
  nested; BOOL takes JSON booleans, integer types integers (range-checked), FP16/FP32/FP64/BF16 numbers,
  BYTES strings (UTF-8).
- Binary tensor extension: an input with `parameters: {binary_data_size: n}` takes the next n bytes after
  the JSON header, whose length is the `Inference-Header-Content-Length` header; inputs take their bytes
  in the order they are listed, and every byte must be taken. BYTES tensors are 4-byte little-endian length
  prefixed elements, as on gRPC.
- `outputs: [{name, parameters: {binary_data: bool}}]`, or none for every output; `parameters:
  {binary_data_output: bool}` on the request sets the default (false: JSON). Binary outputs follow the JSON
  header in the order listed, each with `parameters.binary_data_size`, and the response then carries
  `Inference-Header-Content-Length` and `Content-Type: application/octet-stream`.
- `parameters: {timeout: microseconds}` bounds the wait, as on gRPC. Shared-memory parameters are refused
  (400): shared memory is served over gRPC and the local socket only.
- Request bodies may be gzip or deflate encoded (`Content-Encoding`, tritonclient's request compression);
  responses are never compressed (a client asking for it gets identity, as `Accept-Encoding` allows).

Security (`kernelport.protocol.auth`, the gRPC front end's rules): with an `ssl.SSLContext` the port serves
HTTPS only (the TLS handshake runs in the connection's thread, within `HANDSHAKE_TIMEOUT_S`; with a client
CA in the context, a client without a trusted certificate fails it). With a `TokenTable`, a request whose
path belongs to a protected API group (`auth.http_group`) needs `Authorization: Bearer <token>`; otherwise
it is answered 401 with `{"error": ...}` and `WWW-Authenticate: Bearer`, before its body is read (the
connection is then closed). Tokens never appear in a response or a log line.

Limits: a request body (decompressed too) is at most `max_body_bytes` (default 64 MiB): a larger
Content-Length is answered 413 before the body is read, and the connection is closed. At most
`max_connections` connections are served at once (one thread each); more get 503 and are closed. An idle
or stalled connection is closed after `idle_timeout` seconds.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import ssl
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from kernelport.errors import InvalidInputError, KernelPortError, ModelNotFoundError
from kernelport.protocol import auth
from kernelport.protocol.grpc_frontend import (
    StatusError,
    check_byte_size,
    fmt_shape,
    numpy_dtype,
    parse_bytes_tensor,
    serialize_bytes_tensor,
    server_version,
)
from kernelport.server.scheduling import TENANT_HEADER, check_tenant, parse_priority

__all__ = ["DEFAULT_MAX_BODY_BYTES", "HttpFrontend", "http_status", "serve_http"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 << 20
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_IDLE_TIMEOUT_S = 300.0
HANDSHAKE_TIMEOUT_S = 10.0
SERVER_NAME = "kernelport"
EXTENSIONS = ("model_configuration", "model_repository", "statistics", "binary_tensor_data", "schedule_policy")
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"

# kernelport.errors' gRPC codes -> HTTP status, as Triton maps its error codes
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "ALREADY_EXISTS": 400, "CANCELLED": 400,
    "NOT_FOUND": 404, "UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 503, "DEADLINE_EXCEEDED": 503,
    "UNIMPLEMENTED": 501, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "INTERNAL": 500,
}  # fmt: skip
_INT_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
_FLOAT_TYPES = ("FP16", "FP32", "FP64", "BF16")
_SHM_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")

Headers = Message | Mapping[str, str]  # the request's headers (http.server gives an email Message)


def _authorization(headers: Headers) -> list[tuple[str, str]]:
    """The request's Authorization headers, as gRPC-style metadata for `auth.bearer_token`."""
    values = headers.get_all("Authorization") if isinstance(headers, Message) else (
        [v for k, v in headers.items() if k.lower() == "authorization"])
    return [("authorization", v) for v in values or ()]


def http_status(err: KernelPortError) -> int:
    return _HTTP_STATUS.get(str(getattr(err, "grpc_code", "INTERNAL")), 500)


class HttpError(Exception):
    """A protocol-level error with its HTTP status; `close`: the connection cannot be reused."""

    def __init__(self, status: int, message: str, close: bool = False, allow: str = "",
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.close = close
        self.allow = allow
        self.headers = dict(headers or {})


@dataclass
class Response:
    status: int = 200
    parts: list[bytes | memoryview] = field(default_factory=list)
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(status, [json.dumps(obj, separators=(",", ":")).encode()])


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


# ------------------------------------------------------------------------------------------------------
# tensors


def _flatten(what: str, data: Any) -> list[Any]:
    """The elements of a flat or nested JSON array, in row-major order."""
    if not isinstance(data, list):
        raise InvalidInputError(f"{what}: 'data' must be a JSON array")
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _from_json(what: str, ts: Any, shape: list[int], count: int, data: Any) -> np.ndarray:
    datatype = ts.datatype
    flat = _flatten(what, data)
    if len(flat) != count:
        raise InvalidInputError(f"{what}: 'data' holds {len(flat)} values, expected {count} for shape "
                                f"{fmt_shape(shape)}")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise InvalidInputError(f"{what}: BYTES data must be JSON strings (or send it as binary data)")
        arr = np.empty(count, dtype=np.object_)
        arr[:] = [x.encode("utf-8") for x in flat]
        return arr.reshape(shape)
    if datatype == "BOOL":
        if not all(isinstance(x, bool) for x in flat):
            raise InvalidInputError(f"{what}: BOOL data must be JSON booleans")
        return np.array(flat, dtype=np.bool_).reshape(shape)
    dtype = numpy_dtype(ts, datatype)
    if datatype in _INT_TYPES:
        if not all(type(x) is int for x in flat):
            raise InvalidInputError(f"{what}: {datatype} data must be JSON integers")
        if flat:
            info = np.iinfo(dtype)
            lo, hi = min(flat), max(flat)
            if lo < info.min or hi > info.max:
                raise InvalidInputError(f"{what}: values [{lo}, {hi}] do not fit {datatype}")
        return np.array(flat, dtype=dtype).reshape(shape)
    if datatype in _FLOAT_TYPES:
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
            raise InvalidInputError(f"{what}: {datatype} data must be JSON numbers")
        if datatype == "BF16" and dtype == np.dtype(np.uint16):  # no ml_dtypes: raw bits only
            raise InvalidInputError(f"{what}: BF16 data must be sent as binary data")
        try:
            return np.array(flat, dtype=np.float64).astype(dtype).reshape(shape)
        except OverflowError:  # an integer too large for float64
            raise InvalidInputError(f"{what}: a value does not fit {datatype}") from None
    raise InvalidInputError(f"{what}: {datatype} data cannot be sent as JSON")


def _to_json(what: str, arr: np.ndarray, datatype: str) -> list[Any]:
    flat = arr.reshape(-1)
    if datatype == "BYTES":
        out = []
        for item in flat:
            b = item if isinstance(item, (bytes, bytearray)) else str(item).encode("utf-8")
            try:
                out.append(bytes(b).decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidInputError(f"{what}: holds bytes that are not UTF-8, which JSON cannot carry; "
                                        f"request it with binary_data") from None
        return out
    if datatype == "BF16":
        if flat.dtype == np.dtype(np.uint16):
            raise InvalidInputError(f"{what}: BF16 outputs can only be returned as binary data")
        flat = flat.astype(np.float32)
    return list(flat.tolist())


def _to_bytes(arr: np.ndarray, ts: Any) -> bytes | memoryview:
    if ts.datatype == "BYTES":
        return serialize_bytes_tensor(arr)
    dtype = numpy_dtype(ts, ts.datatype)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data


def _param_bool(params: Mapping[str, Any], key: str, what: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInputError(f"{what}: parameter '{key}' must be a boolean, got {value!r}")
    return value


def _params(obj: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInputError(f"{what}: 'parameters' must be a JSON object")
    return params


def _shape(what: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(type(d) is int for d in value):
        raise InvalidInputError(f"{what}: 'shape' must be an array of integers, got {value!r}"[:300])
    if any(d < 0 for d in value):
        raise InvalidInputError(f"{what}: shape must be non-negative, got {fmt_shape(value)}")
    return value


# ------------------------------------------------------------------------------------------------------
# the front end


class HttpFrontend:
    """The routes, over a data plane; `start()` serves them on host:port in a thread, `stop()` ends that."""

    def __init__(self, dataplane: Any, host: str = "127.0.0.1", port: int = 8000, *,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S, metrics: Callable[[], str] | None = None,
                 ssl_context: ssl.SSLContext | None = None, tokens: auth.TokenTable | None = None) -> None:
        self.dp = dataplane
        self.ssl_context = ssl_context
        self.tokens = tokens
        self.max_body_bytes = int(max_body_bytes)
        self.idle_timeout = float(idle_timeout)
        self.version = server_version()
        self.closed = threading.Event()
        self._in_flight = 0  # requests being handled now (read, answered)
        self._idle = threading.Condition()
        try:
            self.httpd = _HttpServer(host, port, self, max_connections)
        except OSError as e:
            raise OSError(f"cannot listen for HTTP on {host}:{port}: {e.strerror or e}") from None
        self._gpu: Any = None
        if metrics is None:
            from kernelport.metrics import Collector, NvmlMetrics

            self._gpu = NvmlMetrics.create()
            metrics = Collector(dataplane, self._gpu).render
        self.metrics = metrics
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="kp-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait_idle(self, timeout: float) -> bool:
        """After `stop()`: wait up to `timeout` seconds for the requests being handled to be answered
        (a graceful shutdown calls it after the data plane has drained). True when none is left."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def _begin(self) -> None:
        with self._idle:
            self._in_flight += 1

    def _end(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def stop(self) -> None:
        """Stop listening; from now on requests on open connections are answered 503. Requests being
        handled go on (see `wait_idle`)."""
        if self.closed.is_set():
            return
        self.closed.set()
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
        if self._gpu is not None:
            self._gpu.close()

    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else "::1" if self.host == "::" else self.host
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://[{host.strip('[]')}]:{self.port}" if ":" in host else f"{scheme}://{host}:{self.port}"

    def _curl_options(self) -> str:
        opts = " --cacert <CA file>" if self.ssl_context is not None else ""
        if self.tokens is not None and self.tokens.required_for_group("infer") is not None:
            opts += " -H 'Authorization: Bearer <token>'"
        return opts

    def check_token(self, method: str, target: str, headers: Headers) -> None:
        """Raise HttpError 401 when the request's path is in a protected group and it carries no valid
        `Authorization: Bearer` token (the body is not read: the connection is closed)."""
        if self.tokens is None:
            return
        path = urlsplit(target).path
        required = self.tokens.required_for_group(auth.http_group(path))
        if required is None:
            return
        group, accepted = required
        token, why = auth.bearer_token(_authorization(headers))
        what = f"{method} {path[:200]}"
        if token is None:
            why = why.replace("metadata entry", "header").replace("metadata", "header")
            message = (f"{what} needs a bearer token for API group '{group}' ({why}); send the header "
                       "'Authorization: Bearer <token>'")
        elif not self.tokens.matches(token, accepted):
            message = f"{what}: the bearer token is not valid for API group '{group}'"
        else:
            return
        log.info("refused HTTP %s", message)
        raise HttpError(401, message, close=True, headers={"WWW-Authenticate": 'Bearer realm="kernelport"'})

    def how_to_call(self) -> str:
        """What a curl user needs to call the first ready model, printed once at start."""
        url = self.url()
        lines = [f"or over HTTP (KServe v2 REST, tritonclient.http): {url}  (metrics: {url}/metrics)"]
        ready = [n for n in self.dp.model_names() if self.dp.model_ready(n)]
        if ready:
            spec = self.dp.model_spec(ready[0])
            inputs = []
            for t in spec.inputs:
                shape = ([1] if spec.max_batch_size > 0 else []) + [d if d > 0 else 1 for d in t.dims]
                if math.prod(shape) > 64:
                    return "\n".join(lines + [f"    curl{self._curl_options()} {url}/v2/models/{ready[0]}"])
                zero = "false" if t.datatype == "BOOL" else '""' if t.datatype == "BYTES" else "0"
                data = ",".join([zero] * math.prod(shape))
                inputs.append(f'{{"name":"{t.name}","shape":{json.dumps(shape, separators=(",", ":"))},'
                              f'"datatype":"{t.datatype}",'
                              f'"data":[{data}]}}')
            body = f"{{\"inputs\":[{','.join(inputs)}]}}"
            lines.append(f"    curl -s{self._curl_options()} {url}/v2/models/{ready[0]}/infer -d '{body}'")
        return "\n".join(lines)

    # ---- routing ----

    def handle(self, method: str, target: str, headers: Headers, body: bytes) -> Response:
        path = urlsplit(target).path
        segs = path.split("/")
        if segs[0] != "":
            raise HttpError(404, f"unknown path '{path}'"[:300])
        segs = [unquote(s) for s in segs[1:]]
        if len(segs) > 1 and segs[-1] == "":
            segs.pop()
        if segs == ["metrics"]:
            _method(method, "GET")
            from kernelport.metrics import CONTENT_TYPE

            return Response(200, [self.metrics().encode("utf-8")], CONTENT_TYPE)
        if not segs or segs[0] != "v2":
            raise HttpError(404, f"unknown path '{path}'"[:300])
        rest = segs[1:]
        if not rest:
            _method(method, "GET")
            return _json({"name": SERVER_NAME, "version": self.version, "extensions": list(EXTENSIONS)})
        if rest == ["health", "live"]:
            _method(method, "GET")
            return Response(400 if self.closed.is_set() else 200)
        if rest == ["health", "ready"]:
            _method(method, "GET")
            return Response(200 if not self.closed.is_set() and self._server_ready() else 400)
        if rest == ["models", "stats"]:
            _method(method, "GET")
            return self._statistics(None, "")
        if rest[0] == "models" and len(rest) >= 2:
            name, tail, version = rest[1], rest[2:], ""
            if tail[:1] == ["versions"]:
                if len(tail) < 2:
                    raise HttpError(404, f"unknown path '{path}'"[:300])
                version, tail = tail[1], tail[2:]
            action = tail[0] if len(tail) == 1 else "" if not tail else None
            if action == "infer":
                _method(method, "POST")
                return self._infer(name, version, headers, body)
            if action in ("", "ready", "config", "stats"):
                _method(method, "GET")
                if action == "ready":
                    return self._model_ready(name, version)
                if action == "config":
                    return self._model_config(name, version)
                if action == "stats":
                    return self._statistics(name, version)
                return self._model_metadata(name, version)
        if rest == ["repository", "index"]:
            _method(method, "POST")
            return self._repository_index(body)
        if len(rest) == 4 and rest[:2] == ["repository", "models"] and rest[3] in ("load", "unload"):
            _method(method, "POST")
            return self._load(rest[2], body) if rest[3] == "load" else self._unload(rest[2])
        raise HttpError(404, f"unknown path '{path}'"[:300])

    # ---- health and metadata ----

    def _server_ready(self) -> bool:
        ready = getattr(self.dp, "server_ready", None)
        if callable(ready):
            return bool(ready())
        return all(self.dp.model_ready(n) for n in self.dp.model_names())

    def _versions(self, name: str) -> list[str]:
        rt = getattr(self.dp, "models", {}).get(name)
        info = getattr(rt, "info", None)
        return [str(v) for v in info.versions] if info is not None and info.versions else ["1"]

    def _check_version(self, name: str, version: str) -> None:
        if version and version not in self._versions(name):
            raise ModelNotFoundError(f"model '{name}' has no version '{version}'")

    def _model_ready(self, name: str, version: str) -> Response:
        try:
            self.dp.model_spec(name)
            self._check_version(name, version)
        except KernelPortError:
            return Response(400)
        return Response(200 if self.dp.model_ready(name) else 400)

    def _model_metadata(self, name: str, version: str) -> Response:
        spec = self.dp.model_spec(name)
        self._check_version(name, version)
        batch = [-1] if spec.max_batch_size > 0 else []

        def tensors(ts: Sequence[Any]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": batch + [int(d) for d in t.dims]} for t in ts]

        return _json({
            "name": spec.name, "versions": self._versions(name),
            "platform": getattr(spec, "platform", "") or getattr(spec, "backend", "") or "",
            "inputs": tensors(spec.inputs), "outputs": tensors(spec.outputs),
        })

    def _model_config(self, name: str, version: str) -> Response:
        spec = self.dp.model_spec(name)
        self._check_version(name, version)
        proto = getattr(spec, "proto", None)
        if proto is None:
            raise StatusError("INTERNAL", f"model '{name}' has no configuration message")
        return _json(config_json(proto))

    def _statistics(self, name: str | None, version: str) -> Response:
        if name is not None:
            self._check_version(name, version)
            names = [name]
        else:
            names = list(self.dp.model_names())
        out = []
        for n in names:
            try:
                snap = self.dp.statistics(n)
            except ModelNotFoundError:
                if name is not None:
                    raise
                continue  # unloaded meanwhile
            out.append(stats_json(snap))
        return _json({"model_stats": out})

    # ---- repository ----

    def _body_json(self, body: bytes, what: str) -> dict[str, Any]:
        if not body.strip():
            return {}
        doc = _parse_json(body, what)
        if not isinstance(doc, dict):
            raise InvalidInputError(f"{what}: the request body must be a JSON object")
        return doc

    def _repository_index(self, body: bytes) -> Response:
        req = self._body_json(body, "repository index")
        ready_only = _param_bool(req, "ready", "repository index", False)
        out = []
        for entry in self.dp.repository_index():
            name, version, state, reason = (list(entry) + ["", "", "", ""])[:4]
            if ready_only and state != "READY":
                continue
            out.append({"name": str(name), "version": str(version or ""), "state": str(state or ""),
                        "reason": str(reason or "")})
        return _json(out)

    def _load(self, name: str, body: bytes) -> Response:
        what = f"load of model '{name}'"
        params = _params(self._body_json(body, what), what)
        overrides = sorted(k for k in params if k == "config" or k.startswith("file:"))
        if overrides:
            raise StatusError("UNIMPLEMENTED", f"model '{name}': load parameters {', '.join(overrides)} are not "
                                               "supported; edit the repository and load again")
        self.dp.load(name)
        return Response(200)

    def _unload(self, name: str) -> Response:
        self.dp.unload(name)  # "unload_dependents" means nothing here: models have no dependents
        return Response(200)

    # ---- inference ----

    def _infer(self, name: str, version: str, headers: Headers, body: bytes) -> Response:
        spec = self.dp.model_spec(name)
        self._check_version(name, version)
        header_len = headers.get(HEADER_LENGTH)
        if header_len is not None:
            try:
                n = int(header_len)
            except ValueError:
                n = -1
            if not 0 <= n <= len(body):
                raise InvalidInputError(f"{HEADER_LENGTH} must be 0 to the body's length {len(body)}, "
                                        f"got {header_len!r}"[:300])
            header, binary = body[:n], memoryview(body)[n:]
        else:
            header, binary = body, memoryview(b"")
        req = _parse_json(header, f"model '{name}' inference request")
        if not isinstance(req, dict):
            raise InvalidInputError(f"model '{name}': the inference request must be a JSON object")
        params = _params(req, f"model '{name}'")
        inputs = self._decode_inputs(spec, req, binary)
        plan, wanted = self._plan_outputs(spec, req, _param_bool(params, "binary_data_output", f"model '{name}'",
                                                                 False))
        timeout = None
        t = params.get("timeout")
        if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0:
            timeout = float(t) / 1e6
        # Triton's "timeout" bounds the request's wait, and its time in the queue (as on gRPC)
        extra = {"queue_timeout": timeout} if timeout is not None else {}
        # the schedule policy: a priority level, and the tenant (header first, then parameter)
        priority = params.get("priority", 0)
        tenant = check_tenant(headers.get(TENANT_HEADER) or params.get("tenant"), name)
        if self.tokens is not None and self.tokens.tenants:  # a token bound to a tenant decides it
            tenant = auth.request_tenant(self.tokens, _authorization(headers), tenant or None) or ""
        results = self.dp.infer(name, inputs, outputs=wanted, timeout=timeout, **extra,
                                priority=parse_priority(priority, name), tenant=tenant)
        return self._encode_outputs(spec, name, version, req, plan, results)

    def _decode_inputs(self, spec: Any, req: Mapping[str, Any], binary: memoryview) -> dict[str, np.ndarray]:
        model = spec.name
        tensors = req.get("inputs")
        if not isinstance(tensors, list) or not tensors:
            raise InvalidInputError(f"model '{model}': the request needs 'inputs', a non-empty array")
        by_name = {t.name: t for t in spec.inputs}
        decoded: dict[str, np.ndarray] = {}
        pos = 0
        for t in tensors:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise InvalidInputError(f"model '{model}': each input must be an object with a 'name'")
            what = f"model '{model}' input '{t['name']}'"
            ts = by_name.get(t["name"])
            if ts is None:
                raise InvalidInputError(
                    f"model '{model}': unknown input '{t['name']}' (inputs: {', '.join(by_name) or 'none'})")
            if ts.name in decoded:
                raise InvalidInputError(f"{what}: given more than once")
            shape = _shape(what, t.get("shape"))
            datatype = t.get("datatype")
            if datatype != ts.datatype:
                expected = ([-1] if spec.max_batch_size > 0 else []) + [int(d) for d in ts.dims]
                raise InvalidInputError(f"{what}: expected {ts.datatype} {fmt_shape(expected)}, "
                                        f"got {str(datatype)[:32]} {fmt_shape(shape)}")
            count = math.prod(shape)
            p = _params(t, what)
            if any(k in p for k in _SHM_PARAMS):
                raise InvalidInputError(f"{what}: shared memory is not served over HTTP (use gRPC or the local "
                                        "client)")
            if "binary_data_size" in p:
                size = p["binary_data_size"]
                if type(size) is not int or size < 0:
                    raise InvalidInputError(f"{what}: 'binary_data_size' must be a non-negative integer")
                if "data" in t:
                    raise InvalidInputError(f"{what}: both 'data' and 'binary_data_size' given")
                if size > len(binary) - pos:
                    raise InvalidInputError(f"{what}: binary_data_size {size} is more than the {len(binary) - pos} "
                                            "bytes left in the request body")
                chunk = binary[pos:pos + size]
                pos += size
                if ts.datatype == "BYTES":
                    decoded[ts.name] = parse_bytes_tensor(what, bytes(chunk), count).reshape(shape)
                else:
                    check_byte_size(what, count, ts.datatype, size, "binary data")
                    decoded[ts.name] = np.frombuffer(chunk, dtype=numpy_dtype(ts, ts.datatype)).reshape(shape)
            elif "data" in t:
                decoded[ts.name] = _from_json(what, ts, shape, count, t["data"])
            else:
                raise InvalidInputError(f"{what}: no data (expected 'data' or parameters.binary_data_size)")
        if pos != len(binary):
            raise InvalidInputError(f"model '{model}': {len(binary) - pos} bytes of binary data after the "
                                    "inference header belong to no input")
        return decoded

    def _plan_outputs(self, spec: Any, req: Mapping[str, Any],
                      binary_default: bool) -> tuple[list[tuple[Any, bool]], list[str] | None]:
        model = spec.name
        requested = req.get("outputs")
        if requested is None or requested == []:
            return [(t, binary_default) for t in spec.outputs], None
        if not isinstance(requested, list):
            raise InvalidInputError(f"model '{model}': 'outputs' must be an array")
        by_name = {t.name: t for t in spec.outputs}
        plan: list[tuple[Any, bool]] = []
        for o in requested:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise InvalidInputError(f"model '{model}': each requested output must be an object with a 'name'")
            what = f"model '{model}' output '{o['name']}'"
            ts = by_name.get(o["name"])
            if ts is None:
                raise InvalidInputError(
                    f"model '{model}': unknown output '{o['name']}' (outputs: {', '.join(by_name) or 'none'})")
            if any(p[0] is ts for p in plan):
                raise InvalidInputError(f"{what}: requested more than once")
            p = _params(o, what)
            if "classification" in p:
                raise StatusError("UNIMPLEMENTED", f"{what}: the classification extension is not supported")
            if any(k in p for k in _SHM_PARAMS):
                raise InvalidInputError(f"{what}: shared memory is not served over HTTP (use gRPC or the local "
                                        "client)")
            plan.append((ts, _param_bool(p, "binary_data", what, binary_default)))
        return plan, [ts.name for ts, _ in plan]

    def _encode_outputs(self, spec: Any, name: str, version: str, req: Mapping[str, Any],
                        plan: list[tuple[Any, bool]], results: Mapping[str, np.ndarray]) -> Response:
        outputs: list[dict[str, Any]] = []
        blobs: list[bytes | memoryview] = []
        for ts, binary in plan:
            what = f"model '{name}' output '{ts.name}'"
            arr = results.get(ts.name)
            if arr is None:
                raise StatusError("INTERNAL", f"{what}: the model produced no such output")
            arr = np.asarray(arr)
            out: dict[str, Any] = {"name": ts.name, "datatype": ts.datatype, "shape": [int(d) for d in arr.shape]}
            if binary:
                data = _to_bytes(arr, ts)
                out["parameters"] = {"binary_data_size": len(data) if isinstance(data, bytes) else data.nbytes}
                blobs.append(data)
            else:
                out["data"] = _to_json(what, arr, ts.datatype)
            outputs.append(out)
        doc: dict[str, Any] = {"model_name": name, "model_version": version or self._versions(name)[-1]}
        if "id" in req:
            doc["id"] = req["id"]
        doc["outputs"] = outputs
        header = json.dumps(doc, separators=(",", ":")).encode()
        if not blobs:
            return Response(200, [header])
        return Response(200, [header, *blobs], "application/octet-stream", {HEADER_LENGTH: str(len(header))})


def _method(method: str, allowed: str) -> None:
    if method != allowed:
        raise HttpError(405, f"method {method} is not allowed here (use {allowed})", allow=allowed)


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise InvalidInputError(f"{what}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise InvalidInputError(f"{what}: not valid JSON ({e})"[:400]) from None


def config_json(proto: Any) -> dict[str, Any]:
    """A ModelConfig message as JSON with proto field names and 64-bit integers as numbers (as Triton writes
    it; protobuf's JSON mapping would make them strings)."""
    from google.protobuf.json_format import MessageToDict

    d = MessageToDict(proto, preserving_proto_field_name=True)
    _int64_as_numbers(proto, d)
    return d


def _int64_as_numbers(msg: Any, d: dict[str, Any]) -> None:
    from google.protobuf.descriptor import FieldDescriptor as F

    wide = (F.CPPTYPE_INT64, F.CPPTYPE_UINT64)
    for f in msg.DESCRIPTOR.fields:
        if f.name not in d:
            continue
        value = getattr(msg, f.name)
        mt = f.message_type
        if mt is not None and mt.full_name.startswith("google.protobuf."):
            continue  # well-known types have their own JSON forms
        if mt is not None and mt.GetOptions().map_entry:
            vf = mt.fields_by_name["value"]
            if vf.message_type is not None:
                for k, sub in value.items():
                    if str(k) in d[f.name]:
                        _int64_as_numbers(sub, d[f.name][str(k)])
            elif vf.cpp_type in wide:
                d[f.name] = {k: int(v) for k, v in d[f.name].items()}
        elif mt is not None:
            if f.label == F.LABEL_REPEATED:
                for sub, sub_d in zip(value, d[f.name]):
                    _int64_as_numbers(sub, sub_d)
            else:
                _int64_as_numbers(value, d[f.name])
        elif f.cpp_type in wide:
            d[f.name] = [int(x) for x in d[f.name]] if f.label == F.LABEL_REPEATED else int(d[f.name])


def stats_json(snap: Any) -> dict[str, Any]:
    """A StatsSnapshot in Triton's HTTP statistics shape."""

    def dur(x: Any) -> dict[str, int]:
        return {"count": int(getattr(x, "count", 0)), "ns": int(getattr(x, "ns", 0))}

    zero = {"count": 0, "ns": 0}
    return {
        "name": snap.name,
        "version": str(snap.version or "1"),
        "last_inference": int(snap.last_inference_ms),
        "inference_count": int(snap.inference_count),
        "execution_count": int(snap.execution_count),
        "inference_stats": {
            "success": dur(snap.success), "fail": dur(snap.fail), "queue": dur(snap.queue),
            "compute_input": dur(snap.compute_input), "compute_infer": dur(snap.compute_infer),
            "compute_output": dur(snap.compute_output), "cache_hit": zero, "cache_miss": zero,
        },
        "response_stats": {},
        "batch_stats": [
            {"batch_size": int(b.batch_size), "compute_input": dur(b.compute_input),
             "compute_infer": dur(b.compute_infer), "compute_output": dur(b.compute_output)}
            for b in snap.batch_stats
        ],
        "memory_usage": [],
    }


# ------------------------------------------------------------------------------------------------------
# the HTTP server


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, frontend: HttpFrontend, max_connections: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.frontend = frontend
        self.max_connections = max(1, int(max_connections))
        self._active = 0
        self._active_lock = threading.Lock()
        super().__init__((host.strip("[]"), port), _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        context = self.frontend.ssl_context
        if context is not None:  # the handshake runs in the connection's thread (_Handler.setup), not here
            try:
                sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError):
                sock.close()
                raise OSError("TLS wrap failed") from None
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("HTTP connection from %s failed", client_address, exc_info=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            refuse = self._active >= self.max_connections
            if not refuse:
                self._active += 1
        if refuse:
            body = json.dumps({"error": "too many connections; try again"}).encode()
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._active_lock:
                self._active -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active -= 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = SERVER_NAME
    sys_version = ""
    error_content_type = JSON_TYPE
    error_message_format = '{"error": "%(code)d %(message)s"}'
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        self.tls_failed = False
        try:  # small responses go out at once (no Nagle wait behind the headers)
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                self.connection.do_handshake()
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError: a plaintext or untrusted client
                log.debug("TLS handshake with %s failed: %s", self.client_address, e)
                self.tls_failed = True
                self.close_connection = True
        self.connection.settimeout(self.server.frontend.idle_timeout)

    def handle(self) -> None:
        if not self.tls_failed:
            super().handle()

    def version_string(self) -> str:
        return f"{SERVER_NAME}/{self.server.frontend.version}"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        fe = self.server.frontend
        fe._begin()
        try:
            self._answer(fe, method)
        finally:
            fe._end()

    def _answer(self, fe: HttpFrontend, method: str) -> None:
        try:
            if fe.closed.is_set():
                raise HttpError(503, "the server is shutting down", close=True)
            fe.check_token(method, self.path, self.headers)
            body = self._read_body(fe.max_body_bytes)
            resp = fe.handle(method, self.path, self.headers, body)
        except HttpError as e:
            if e.close:
                self.close_connection = True
            resp = _error(e.status, str(e))
            resp.headers.update(e.headers)
            if e.allow:
                resp.headers["Allow"] = e.allow
        except KernelPortError as e:
            resp = _error(http_status(e), str(e) or type(e).__name__)
        except Exception:
            log.exception("HTTP %s %s failed", method, self.path[:200])
            resp = _error(500, f"internal error in {method} {urlsplit(self.path).path[:200]}; see the server log")
        self._send(resp)

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue` (curl sends it for large bodies): refuse a body over the limit, or a request
        without a valid token, before the client sends the body."""
        try:
            self.server.frontend.check_token(self.command, self.path, self.headers)
        except HttpError as e:
            self.close_connection = True
            resp = _error(e.status, str(e))
            resp.headers.update(e.headers)
            self._send(resp)
            return False
        limit = self.server.frontend.max_body_bytes
        length = self.headers.get("Content-Length") or "0"
        if length.strip().isdigit() and int(length) > limit:
            self.close_connection = True
            self._send(_error(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes"))
            return False
        return super().handle_expect_100()

    def _read_body(self, limit: int) -> bytes:
        te = self.headers.get("Transfer-Encoding")
        if te is not None and te.strip().lower() != "identity":
            raise HttpError(411, "Transfer-Encoding is not supported: send the body with a Content-Length",
                            close=True)
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            raise HttpError(400, f"bad Content-Length {length[:40]!r}", close=True) from None
        if n > limit:
            raise HttpError(413, f"request body of {n} bytes is over the limit of {limit} bytes", close=True)
        data = self.rfile.read(n)
        if len(data) != n:
            raise HttpError(400, "the request body ended early", close=True)
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding in ("gzip", "deflate"):
            return _decompress(data, encoding, limit)
        if encoding != "identity":
            raise HttpError(415, f"Content-Encoding {encoding[:40]!r} is not supported (gzip, deflate)")
        return data

    def _send(self, resp: Response) -> None:
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(sum(len(p) if isinstance(p, bytes) else p.nbytes
                                                       for p in resp.parts)))
            for k, v in resp.headers.items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            for part in resp.parts:
                self.wfile.write(part)
        except OSError:  # the client went away
            self.close_connection = True


def _decompress(data: bytes, encoding: str, limit: int) -> bytes:
    d = zlib.decompressobj(zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise HttpError(400, f"the {encoding} request body does not decompress: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise HttpError(413, f"the decompressed request body is over the limit of {limit} bytes")
    if not d.eof:
        raise HttpError(400, f"the {encoding} request body is truncated")
    return out


def serve_http(dataplane: Any, host: str = "127.0.0.1", port: int = 8000, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_connections: int = DEFAULT_MAX_CONNECTIONS,
               ssl_context: ssl.SSLContext | None = None, tokens: auth.TokenTable | None = None) -> HttpFrontend:
    """Start the HTTP front end on host:port (`port=0`: a free one, see `.port`) and return it; HTTPS with
    `ssl_context`, bearer tokens per API group with `tokens`. Raises OSError when the address cannot be bound."""
    fe = HttpFrontend(dataplane, host, port, max_body_bytes=max_body_bytes, max_connections=max_connections,
                      ssl_context=ssl_context, tokens=tokens)
    fe.start()
    log.info("HTTP front end (KServe v2 REST, /metrics) listening on %s:%d%s (max body %d bytes, at most %d "
             "connections)", host, fe.port, " over TLS" if ssl_context is not None else "", fe.max_body_bytes,
             max_connections)
    if tokens is not None:
        log.info("HTTP bearer tokens required for: %s", ", ".join(tokens.protected_groups))
    return fe
