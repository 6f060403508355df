"""The gRPC front end: Triton's `inference.GRPCInferenceService` and `grpc.health.v1.Health`, over a DataPlane.

Two engines serve it (`serve_grpc(engine=...)`, `--grpc-engine`, `KERNELPORT_GRPC_ENGINE`): "native", the
HTTP/2 transport in C (`kernelport.protocol.grpc_native`, the default for plaintext), and "grpcio", Python
grpcio's server (always used with TLS). Both run the handlers of `InferenceServicer.method_handlers()`.

Messages come from KernelPort's private descriptor pool (`kernelport.protocol.message_class`), so the
service is registered with generic handlers, never generated `_pb2_grpc` code. Everything model-specific goes
through the transport-independent `DataPlane` (docs/internals.md); this module only translates the wire:
it validates and decodes tensors, maps `kernelport.errors` to status codes, and serves the shared-memory,
statistics, repository and health RPCs.

What `ServerMetadata.extensions` lists, and why (only what really works):
- "model_configuration": ModelConfig returns the model's parsed config.pbtxt (`spec.proto`).
- "model_repository": RepositoryIndex / RepositoryModelLoad / RepositoryModelUnload (load without the
  "config" / "file:" override parameters, which answer UNIMPLEMENTED).
- "statistics": ModelStatistics from the data plane's counters.
- "schedule_policy": the request parameters "priority" (a level of the model's priority_levels; 0 = the
  default level) and "timeout" (microseconds).
- "system_shared_memory": only when the server allows client shared memory (`allow_client_shm`); otherwise
  registration answers UNAVAILABLE, as Triton does for a restricted or absent shared-memory endpoint.
- "cuda_shared_memory": only when client shared memory is allowed and a CUDA stack is present (device nodes
  and cupy); handles are opened by a helper process (`kernelport.gpu.cuda_shm`: the server process never
  initialises CUDA) and the registered size is checked against the allocation's real size. Without CUDA,
  registration answers UNAVAILABLE.
Not listed: "classification", "sequence", "binary_tensor_data" (HTTP only), "trace", "logging"
(TraceSetting and LogSettings answer UNIMPLEMENTED).

Wire rules, as Triton applies them:
- Tensor bytes come from `raw_input_contents` (one entry per input, in order; an entry per non-shared-memory
  input is accepted too), from typed `contents` (never both in one request; FP16/BF16 have no typed field),
  or from a registered region (`shared_memory_region`, `shared_memory_byte_size`, `shared_memory_offset`).
- Outputs are returned as `raw_output_contents`, in the order of the requested outputs (every output when
  none is requested). An output requested into a shared-memory region is written there; its tensor metadata
  is returned without bytes. When some outputs are in a region and some are not, regions get an empty raw
  entry so that entry i stays output i (tritonclient indexes raw contents by output position).
- The request parameter "timeout" (microseconds) and the gRPC deadline bound the data plane's wait;
  "binary_data" and other HTTP-only parameters are ignored.
- The tenant a request counts against (weighted shares, `kernelport.server.scheduling`) is the metadata
  header `kernelport-tenant`, else the string request parameter "tenant".
- ModelStreamInfer answers each request with one response, in completion order (each carries its id);
  a failed request gets `error_message` and the stream goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from kernelport.client.lanes import Cancellation
from kernelport.errors import ConfigError, InvalidInputError, KernelPortError, ModelNotFoundError
from kernelport.gpu.cuda_shm import CudaSharedMemoryRegistry
from kernelport.protocol import auth, message_class
from kernelport.server.external import ExternalPlace
from kernelport.server.scheduling import TENANT_HEADER, check_tenant
from kernelport.server.shm_registry import SharedMemoryRegion, SharedMemoryRegistry

__all__ = [
    "HEALTH_SERVICE_NAME",
    "ITEMSIZE",
    "SERVICE_NAME",
    "GRPC_ENGINES",
    "GrpcFrontendServer",
    "InferenceServicer",
    "StatusError",
    "check_byte_size",
    "fmt_shape",
    "grpc_engine",
    "numpy_dtype",
    "parse_bytes_tensor",
    "serialize_bytes_tensor",
    "server_version",
    "serve_grpc",
]


if TYPE_CHECKING:
    from kernelport.protocol.grpc_native import NativeGrpcServer
    from kernelport.server.dataplane import DataPlane

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
SERVER_NAME = "kernelport"
DEFAULT_WORKERS = 64

_STREAM_WINDOW = 64  # requests of one stream in flight at once; more wait (backpressure on the client)
_WATCH_POLL_S = 1.0
_MAX_WATCHES = 16

# Item size of each fixed-size datatype; BYTES is variable.
_ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
    "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8, "BF16": 2,
}  # fmt: skip
# Typed contents field of each datatype (FP16 and BF16 have none: raw only).
_TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip
_TYPED_FIELDS = tuple(sorted(set(_TYPED_FIELD.values())))
_TYPED_WIDE: dict[str, type[np.generic]] = {
    "bool_contents": np.bool_, "int_contents": np.int64, "int64_contents": np.int64,
    "uint_contents": np.uint64, "uint64_contents": np.uint64, "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}  # fmt: skip
_LEN = struct.Struct("<I")

_SHM_REGION = "shared_memory_region"
_SHM_SIZE = "shared_memory_byte_size"
_SHM_OFFSET = "shared_memory_offset"


class StatusError(KernelPortError):
    """An error with an explicit gRPC status (for codes the data plane's errors do not cover)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.grpc_code = code


# ------------------------------------------------------------------------------------------------------
# helpers


def _server_version() -> str:
    try:
        import kernelport

        version = getattr(kernelport, "__version__", None)
        if isinstance(version, str) and version:
            return version
    except ImportError:
        pass
    try:
        return importlib_metadata.version("kernelport")
    except importlib_metadata.PackageNotFoundError:
        return "0.1.0"


def _fmt_shape(shape: Iterable[int]) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def _status_code(err: KernelPortError) -> grpc.StatusCode:
    try:
        return grpc.StatusCode[err.grpc_code]
    except KeyError:
        return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, err: KernelPortError) -> None:
    context.abort(_status_code(err), str(err) or type(err).__name__)


def _schedule_policy(request: Any, tenant: str | None, model: str) -> tuple[int, str]:
    """The request's priority parameter and its tenant (the header's, else the "tenant" parameter)."""
    priority = _param_uint(request.parameters, "priority", f"model '{model}'") or 0
    if tenant is None and "tenant" in request.parameters:
        tenant = _param_value(request.parameters["tenant"])
    return priority, check_tenant(tenant, model)


def _tenant_header(context: grpc.ServicerContext) -> str | None:
    """The `kernelport-tenant` metadata header, None when absent."""
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_HEADER:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


def _param_value(param: Message) -> Any:
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def _param_uint(params: Any, key: str, what: str) -> int | None:
    """A non-negative integer parameter (int64_param or uint64_param), None when absent."""
    if key not in params:
        return None
    param = params[key]
    which = param.WhichOneof("parameter_choice")
    if which not in ("int64_param", "uint64_param"):
        raise InvalidInputError(f"{what}: parameter '{key}' must be an integer, got {which or 'nothing'}")
    value = int(getattr(param, which))
    if value < 0:
        raise InvalidInputError(f"{what}: parameter '{key}' must be non-negative, got {value}")
    return value


@dataclass(frozen=True)
class _ShmRef:
    region: str
    byte_size: int
    offset: int


def _shm_ref(params: Any, what: str) -> _ShmRef | None:
    if _SHM_REGION not in params:
        if _SHM_SIZE in params or _SHM_OFFSET in params:
            raise InvalidInputError(f"{what}: shared memory byte size or offset given without a region")
        return None
    region_param = params[_SHM_REGION]
    if region_param.WhichOneof("parameter_choice") != "string_param" or not region_param.string_param:
        raise InvalidInputError(f"{what}: parameter '{_SHM_REGION}' must be a non-empty string")
    byte_size = _param_uint(params, _SHM_SIZE, what)
    if byte_size is None:
        raise InvalidInputError(f"{what}: parameter '{_SHM_SIZE}' is required with '{_SHM_REGION}'")
    offset = _param_uint(params, _SHM_OFFSET, what) or 0
    return _ShmRef(region_param.string_param, byte_size, offset)


def _parse_bytes_tensor(what: str, data: bytes, count: int) -> np.ndarray:
    """Elements of a BYTES tensor: each a 4-byte little-endian length, then that many bytes."""
    items: list[bytes] = []
    end = len(data)
    pos = 0
    while pos < end:
        if end - pos < 4:
            raise InvalidInputError(f"{what}: BYTES element {len(items)} has a truncated length prefix")
        (length,) = _LEN.unpack_from(data, pos)
        pos += 4
        if length > end - pos:
            raise InvalidInputError(
                f"{what}: BYTES element {len(items)} claims {length} bytes, only {end - pos} remain"
            )
        if len(items) == count:
            raise InvalidInputError(f"{what}: expected {count} BYTES elements, got more")
        items.append(data[pos : pos + length])
        pos += length
    if len(items) != count:
        raise InvalidInputError(f"{what}: expected {count} BYTES elements, got {len(items)}")
    arr = np.empty(count, dtype=np.object_)
    arr[:] = items
    return arr


def _serialize_bytes_tensor(arr: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in arr.reshape(-1):
        if isinstance(item, (bytes, bytearray)):
            b = bytes(item)
        elif isinstance(item, str):
            b = item.encode("utf-8")
        else:
            b = str(item).encode("utf-8")
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def _numpy_dtype(tensor_spec: Any, datatype: str) -> np.dtype[Any]:
    dtype = getattr(tensor_spec, "dtype", None)
    if dtype is not None:
        return np.dtype(dtype)
    if datatype == "BF16":
        return np.dtype(np.uint16)  # raw bfloat16 bits where ml_dtypes is absent
    raise StatusError("INTERNAL", f"tensor '{tensor_spec.name}' has no numpy dtype for {datatype}")


T = TypeVar("T")


# ------------------------------------------------------------------------------------------------------
# the servicer


class InferenceServicer:
    """Answers every RPC of `inference.GRPCInferenceService` and `grpc.health.v1.Health`."""

    def __init__(
        self,
        dataplane: DataPlane,
        shm: SharedMemoryRegistry | None = None,
        *,
        stream_workers: int = DEFAULT_WORKERS,
        cuda_shm: CudaSharedMemoryRegistry | None = None,
    ) -> None:
        self.dp = dataplane
        self.tokens: auth.TokenTable | None = None  # set when tokens may bind requests to tenants
        self.shm = shm if shm is not None else SharedMemoryRegistry(allowed=False)
        self.cuda_shm = cuda_shm if cuda_shm is not None else CudaSharedMemoryRegistry(allowed=self.shm.allowed)
        self.version = _server_version()
        self._stream_pool = ThreadPoolExecutor(
            max_workers=stream_workers, thread_name_prefix="kp-grpc-stream"
        )
        self._watches = threading.BoundedSemaphore(_MAX_WATCHES)
        self._plans: dict[str, _ModelPlan] = {}  # per model, rebuilt when its spec changes (reload)
        self._closed = threading.Event()
        m = message_class
        self.ModelInferResponse = m("inference.ModelInferResponse")
        self.ModelStreamInferResponse = m("inference.ModelStreamInferResponse")
        self.HealthCheckResponse = m("grpc.health.v1.HealthCheckResponse")
        serving = self.HealthCheckResponse.DESCRIPTOR.enum_types_by_name["ServingStatus"].values_by_name
        self._SERVING = serving["SERVING"].number
        self._NOT_SERVING = serving["NOT_SERVING"].number
        self._SERVICE_UNKNOWN = serving["SERVICE_UNKNOWN"].number

    def close(self) -> None:
        self._closed.set()
        self._stream_pool.shutdown(wait=False, cancel_futures=True)
        self.shm.close()
        self.cuda_shm.close()

    # -- registration --------------------------------------------------------------------------------

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        return [
            grpc.method_handlers_generic_handler(service, methods)
            for service, methods in self.method_handlers().items()
        ]

    def method_handlers(self) -> dict[str, dict[str, grpc.RpcMethodHandler]]:
        """Every RPC's handler, by service and method name (grpcio's engine and the native one share it)."""
        m = message_class

        def unary(
            fn: Callable[[Any, grpc.ServicerContext], Any], req: str, resp: str
        ) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                self._guard(fn),
                request_deserializer=m(req).FromString,
                response_serializer=m(resp).SerializeToString,
            )

        inf = "inference."
        table: dict[str, tuple[Callable[[Any, grpc.ServicerContext], Any], str]] = {
            "ServerLive": (self.server_live, "ServerLive"),
            "ServerReady": (self.server_ready, "ServerReady"),
            "ModelReady": (self.model_ready, "ModelReady"),
            "ServerMetadata": (self.server_metadata, "ServerMetadata"),
            "ModelMetadata": (self.model_metadata, "ModelMetadata"),
            "ModelInfer": (self.model_infer, "ModelInfer"),
            "ModelConfig": (self.model_config, "ModelConfig"),
            "ModelStatistics": (self.model_statistics, "ModelStatistics"),
            "RepositoryIndex": (self.repository_index, "RepositoryIndex"),
            "RepositoryModelLoad": (self.repository_model_load, "RepositoryModelLoad"),
            "RepositoryModelUnload": (self.repository_model_unload, "RepositoryModelUnload"),
            "SystemSharedMemoryStatus": (self.system_shm_status, "SystemSharedMemoryStatus"),
            "SystemSharedMemoryRegister": (self.system_shm_register, "SystemSharedMemoryRegister"),
            "SystemSharedMemoryUnregister": (self.system_shm_unregister, "SystemSharedMemoryUnregister"),
            "CudaSharedMemoryStatus": (self.cuda_shm_status, "CudaSharedMemoryStatus"),
            "CudaSharedMemoryRegister": (self.cuda_shm_register, "CudaSharedMemoryRegister"),
            "CudaSharedMemoryUnregister": (self.cuda_shm_unregister, "CudaSharedMemoryUnregister"),
            "TraceSetting": (self.trace_setting, "TraceSetting"),
            "LogSettings": (self.log_settings, "LogSettings"),
        }
        methods: dict[str, grpc.RpcMethodHandler] = {
            rpc: unary(fn, f"{inf}{msg}Request", f"{inf}{msg}Response") for rpc, (fn, msg) in table.items()
        }
        # The one streaming RPC; its messages are not named after it
        # (ModelInferRequest in, ModelStreamInferResponse out).
        methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer,
            request_deserializer=m("inference.ModelInferRequest").FromString,
            response_serializer=m("inference.ModelStreamInferResponse").SerializeToString,
        )
        health = {
            "Check": grpc.unary_unary_rpc_method_handler(
                self._guard(self.health_check),
                request_deserializer=m("grpc.health.v1.HealthCheckRequest").FromString,
                response_serializer=m("grpc.health.v1.HealthCheckResponse").SerializeToString,
            ),
            "Watch": grpc.unary_stream_rpc_method_handler(
                self.health_watch,
                request_deserializer=m("grpc.health.v1.HealthCheckRequest").FromString,
                response_serializer=m("grpc.health.v1.HealthCheckResponse").SerializeToString,
            ),
        }
        return {SERVICE_NAME: methods, HEALTH_SERVICE_NAME: health}

    @staticmethod
    def _guard(fn: Callable[[Any, grpc.ServicerContext], T]) -> Callable[[Any, grpc.ServicerContext], T]:
        """Turn KernelPort errors into their status; anything else into INTERNAL, logged, never leaked."""

        def call(request: Any, context: grpc.ServicerContext) -> T:
            try:
                return fn(request, context)
            except KernelPortError as err:
                _abort(context, err)
            except Exception:
                log.exception("gRPC %s failed", fn.__name__)
                context.abort(
                    grpc.StatusCode.INTERNAL, f"internal error in {fn.__name__}; see the server log"
                )
            raise AssertionError("unreachable: context.abort raises")

        call.__name__ = fn.__name__
        return call

    # -- health and metadata -------------------------------------------------------------------------

    def _server_ready(self) -> bool:
        # The data plane's own answer where it has one (DataPlane.server_ready), else: every model ready.
        server_ready = getattr(self.dp, "server_ready", None)
        if callable(server_ready):
            return bool(server_ready())
        return all(self.dp.model_ready(name) for name in self.dp.model_names())

    def server_live(self, request: Any, context: grpc.ServicerContext) -> Message:
        return message_class("inference.ServerLiveResponse")(live=not self._closed.is_set())

    def server_ready(self, request: Any, context: grpc.ServicerContext) -> Message:
        return message_class("inference.ServerReadyResponse")(ready=self._server_ready())

    def _versions(self, name: str) -> list[str]:
        versions: set[str] = set()
        for entry in self.dp.repository_index():
            entry_name, version = _index_field(entry, 0, "name"), _index_field(entry, 1, "version")
            if entry_name == name and version:
                versions.add(str(version))
        return sorted(versions, key=lambda v: (len(v), v)) or ["1"]

    def _check_version(self, name: str, version: str) -> None:
        if version and version not in self._versions(name):
            raise ModelNotFoundError(f"model '{name}' has no version '{version}'")

    def model_ready(self, request: Any, context: grpc.ServicerContext) -> Message:
        # Never an error: an unknown model, an unknown version or a model not (yet) loaded is "not ready".
        resp = message_class("inference.ModelReadyResponse")
        try:
            self._check_version(request.name, request.version)
        except ModelNotFoundError:
            return resp(ready=False)
        return resp(ready=bool(self.dp.model_ready(request.name)))

    def server_metadata(self, request: Any, context: grpc.ServicerContext) -> Message:
        extensions = ["model_configuration", "model_repository", "statistics", "schedule_policy"]
        if self.shm.allowed:
            extensions.append("system_shared_memory")
        if self.cuda_shm.available():
            extensions.append("cuda_shared_memory")
        return message_class("inference.ServerMetadataResponse")(
            name=SERVER_NAME, version=self.version, extensions=extensions
        )

    def model_metadata(self, request: Any, context: grpc.ServicerContext) -> Message:
        spec = self.dp.model_spec(request.name)
        self._check_version(request.name, request.version)
        resp = message_class("inference.ModelMetadataResponse")(
            name=spec.name,
            versions=self._versions(request.name),
            platform=getattr(spec, "platform", "") or getattr(spec, "backend", "") or "",
        )
        batch = [-1] if spec.max_batch_size > 0 else []
        for tensors, field in ((spec.inputs, resp.inputs), (spec.outputs, resp.outputs)):
            for t in tensors:
                field.add(name=t.name, datatype=t.datatype, shape=batch + [int(d) for d in t.dims])
        return resp

    def model_config(self, request: Any, context: grpc.ServicerContext) -> Message:
        spec = self.dp.model_spec(request.name)
        self._check_version(request.name, request.version)
        resp = message_class("inference.ModelConfigResponse")()
        proto = getattr(spec, "proto", None)
        if proto is None:
            raise StatusError("INTERNAL", f"model '{request.name}' has no configuration message")
        try:
            resp.config.CopyFrom(proto)
        except TypeError:  # the same message from another pool: copy through the wire format
            resp.config.ParseFromString(proto.SerializeToString())
        return resp

    # -- statistics ----------------------------------------------------------------------------------

    def model_statistics(self, request: Any, context: grpc.ServicerContext) -> Message:
        resp = message_class("inference.ModelStatisticsResponse")()
        if request.name:
            self.dp.model_spec(request.name)
            self._check_version(request.name, request.version)
            names = [request.name]
        else:
            names = list(self.dp.model_names())
        for name in names:
            try:
                stats = self.dp.statistics(name)
            except ModelNotFoundError:
                if request.name:
                    raise
                continue  # listed but unloaded meanwhile
            snap = stats.snapshot() if hasattr(stats, "snapshot") else stats
            _fill_model_statistics(resp.model_stats.add(), name, snap)
        return resp

    # -- repository ----------------------------------------------------------------------------------

    def repository_index(self, request: Any, context: grpc.ServicerContext) -> Message:
        resp = message_class("inference.RepositoryIndexResponse")()
        for entry in self.dp.repository_index():
            state = str(_index_field(entry, 2, "state") or "")
            if request.ready and state != "READY":
                continue
            resp.models.add(
                name=str(_index_field(entry, 0, "name")),
                version=str(_index_field(entry, 1, "version") or ""),
                state=state,
                reason=str(_index_field(entry, 3, "reason") or ""),
            )
        return resp

    def repository_model_load(self, request: Any, context: grpc.ServicerContext) -> Message:
        overrides = [k for k in request.parameters if k == "config" or k.startswith("file:")]
        if overrides:
            raise StatusError(
                "UNIMPLEMENTED",
                f"model '{request.model_name}': load parameters {', '.join(sorted(overrides))} are not supported; "
                "edit the repository and load again",
            )
        if not request.model_name:
            raise InvalidInputError("RepositoryModelLoad needs a model_name")
        self.dp.load(request.model_name)
        return message_class("inference.RepositoryModelLoadResponse")()

    def repository_model_unload(self, request: Any, context: grpc.ServicerContext) -> Message:
        if not request.model_name:
            raise InvalidInputError("RepositoryModelUnload needs a model_name")
        self.dp.unload(request.model_name)
        return message_class("inference.RepositoryModelUnloadResponse")()

    # -- shared memory -------------------------------------------------------------------------------

    def system_shm_status(self, request: Any, context: grpc.ServicerContext) -> Message:
        resp = message_class("inference.SystemSharedMemoryStatusResponse")()
        for info in self.shm.status(request.name):
            r = resp.regions[info.name]
            r.name, r.key, r.offset, r.byte_size = info.name, info.key, info.offset, info.byte_size
        return resp

    def system_shm_register(self, request: Any, context: grpc.ServicerContext) -> Message:
        self.shm.register(request.name, request.key, int(request.offset), int(request.byte_size))
        return message_class("inference.SystemSharedMemoryRegisterResponse")()

    def system_shm_unregister(self, request: Any, context: grpc.ServicerContext) -> Message:
        self.shm.unregister(request.name)
        return message_class("inference.SystemSharedMemoryUnregisterResponse")()

    def cuda_shm_status(self, request: Any, context: grpc.ServicerContext) -> Message:
        resp = message_class("inference.CudaSharedMemoryStatusResponse")()
        for info in self.cuda_shm.status(request.name):
            r = resp.regions[info.name]
            r.name, r.device_id, r.byte_size = info.name, info.device_id, info.byte_size
        return resp

    def cuda_shm_register(self, request: Any, context: grpc.ServicerContext) -> Message:
        self.cuda_shm.register(request.name, request.raw_handle, int(request.device_id), int(request.byte_size))
        return message_class("inference.CudaSharedMemoryRegisterResponse")()

    def cuda_shm_unregister(self, request: Any, context: grpc.ServicerContext) -> Message:
        self.cuda_shm.unregister(request.name)
        return message_class("inference.CudaSharedMemoryUnregisterResponse")()

    # -- trace and log -------------------------------------------------------------------------------

    def trace_setting(self, request: Any, context: grpc.ServicerContext) -> Message:
        raise StatusError(
            "UNIMPLEMENTED", "TraceSetting is not implemented by KernelPort (no request tracing)"
        )

    def log_settings(self, request: Any, context: grpc.ServicerContext) -> Message:
        raise StatusError(
            "UNIMPLEMENTED",
            "LogSettings is not implemented by KernelPort; set the log level when starting the server",
        )

    # -- grpc.health.v1 ------------------------------------------------------------------------------

    def _health_status(self, service: str) -> int | None:
        if service in ("", SERVICE_NAME):
            return self._SERVING if not self._closed.is_set() and self._server_ready() else self._NOT_SERVING
        if service == HEALTH_SERVICE_NAME:
            return self._SERVING if not self._closed.is_set() else self._NOT_SERVING
        return None

    def health_check(self, request: Any, context: grpc.ServicerContext) -> Message:
        status = self._health_status(request.service)
        if status is None:
            raise StatusError("NOT_FOUND", f"unknown service '{request.service}'")
        return self.HealthCheckResponse(status=status)

    def health_watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Message]:
        if not self._watches.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many health watches open")
        try:
            stop = threading.Event()
            context.add_callback(stop.set)
            last: int | None = -1
            while context.is_active() and not stop.is_set():
                try:
                    status = self._health_status(request.service)
                except Exception:
                    log.exception("health status failed")
                    status = self._NOT_SERVING
                if status is None:
                    status = self._SERVICE_UNKNOWN
                if status != last:
                    last = status
                    yield self.HealthCheckResponse(status=status)
                stop.wait(_WATCH_POLL_S)
        finally:
            self._watches.release()

    # -- inference -----------------------------------------------------------------------------------

    def model_infer(self, request: Any, context: grpc.ServicerContext) -> Message:
        # A call cancelled by its client, or whose deadline passes, releases its request at once
        # (gRPC runs the callback on cancellation and deadline; on a normal end it finds nothing held).
        cancel = Cancellation()
        if not context.add_callback(cancel.cancel):
            cancel.cancel()  # the call has already ended
        return self.infer(request, context.time_remaining(), cancel=cancel, tenant=self._tenant(context))

    def model_stream_infer(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Message]:
        results: queue.Queue[Any] = queue.Queue()
        stop = object()
        in_flight: set[Cancellation] = set()
        in_flight_lock = threading.Lock()
        ended = False

        def on_end() -> None:  # the stream was cancelled, timed out or finished
            nonlocal ended
            with in_flight_lock:
                ended = True
                pending = list(in_flight)
            for c in pending:
                c.cancel()
            results.put(stop)

        context.add_callback(on_end)
        window = threading.BoundedSemaphore(_STREAM_WINDOW)
        try:
            tenant = self._tenant(context)
        except KernelPortError as err:  # a token bound to another tenant: the stream is refused
            _abort(context, err)

        def run_one(request: Any) -> None:
            resp = self.ModelStreamInferResponse()
            cancel = Cancellation()
            with in_flight_lock:
                if ended:
                    cancel.cancel()
                in_flight.add(cancel)
            try:
                self.infer(request, context.time_remaining(), into=resp.infer_response, cancel=cancel, tenant=tenant)
            except KernelPortError as err:
                resp.Clear()
                resp.error_message = str(err) or type(err).__name__
                resp.infer_response.model_name = request.model_name
                resp.infer_response.model_version = request.model_version
                resp.infer_response.id = request.id
            except Exception:
                log.exception("gRPC ModelStreamInfer request failed")
                resp.Clear()
                resp.error_message = "internal error in ModelStreamInfer; see the server log"
                resp.infer_response.id = request.id
            finally:
                with in_flight_lock:
                    in_flight.discard(cancel)
            results.put(resp)

        def read_requests() -> None:
            submitted = 0
            try:
                for request in request_iterator:
                    while not window.acquire(timeout=0.5):  # the client is not reading its responses
                        if not context.is_active():
                            return
                    self._stream_pool.submit(run_one, request)
                    submitted += 1
            except Exception:  # the stream was cancelled or broke: the callback above ends the handler
                log.debug("ModelStreamInfer request stream ended", exc_info=True)
            finally:
                results.put(("done", submitted))

        threading.Thread(target=read_requests, name="kp-grpc-stream-reader", daemon=True).start()
        answered = 0
        expected: int | None = None
        while expected is None or answered < expected:
            item = results.get()
            if item is stop:
                return
            if isinstance(item, tuple):
                expected = item[1]
                continue
            answered += 1
            window.release()
            yield item

    def infer(self, request: Any, deadline_s: float | None = None, into: Message | None = None,
              cancel: Cancellation | None = None, tenant: str | None = None) -> Message:
        """Run one ModelInferRequest through the data plane; raises KernelPortError subclasses.

        The response is built in `into` when given (a ModelInferResponse inside a stream response, so the
        output bytes are not copied twice), else in a new message. `cancel` is the call's cancel switch.
        """
        name = request.model_name
        if not name:
            raise InvalidInputError("model_name is required")
        spec = self.dp.model_spec(name)
        info = self.dp.model_info(name)
        if request.model_version and request.model_version not in info.versions:
            raise ModelNotFoundError(f"model '{name}' has no version '{request.model_version}'")
        plan = self._model_plan(name, spec, info)
        if plan.fast:
            checked = _fast_inputs(plan, request)
            outs = _fast_outputs(plan, request) if checked is not None else None
            if checked is not None and outs is not None:
                return self._fast_infer(plan, request, checked, outs, deadline_s, into, cancel, tenant)
        with contextlib.ExitStack() as stack:
            regions: dict[str, SharedMemoryRegion] = {}

            def region(region_name: str) -> SharedMemoryRegion:
                if region_name not in regions and self.cuda_shm.has(region_name):
                    # a CUDA region reads and writes as a system one does (kernelport.gpu.cuda_shm)
                    regions[region_name] = stack.enter_context(self.cuda_shm.use(region_name))  # type: ignore[assignment]
                if region_name not in regions:
                    regions[region_name] = stack.enter_context(self.shm.use(region_name))
                return regions[region_name]

            shm_inputs: dict[str, _ShmRef] = {}
            inputs = self._decode_inputs(spec, request, region, shm_inputs)
            out_plan = self._plan_outputs(spec, request)
            timeout = _timeout(request, deadline_s)
            wanted = [o.name for o in out_plan] if len(request.outputs) else None
            priority, tenant = _schedule_policy(request, tenant, name)
            to_regions = {p.name: p for p in out_plan if p.shm is not None and p.spec.datatype != "BYTES"}
            written: set[str] = set()
            # tensors in system regions: the worker may read and write them there (server/external.py)
            external: dict[tuple[str, str], ExternalPlace] = {}
            for in_name, ref in shm_inputs.items():
                if isinstance(regions.get(ref.region), SharedMemoryRegion):
                    external[("input", in_name)] = ExternalPlace(regions[ref.region], ref.offset, ref.byte_size)
            for p in to_regions.values():
                assert p.shm is not None
                r = region(p.shm.region)
                if isinstance(r, SharedMemoryRegion):
                    external[("output", p.name)] = ExternalPlace(r, p.shm.offset, p.shm.byte_size)

            def into_region(out_name: str, rows: np.ndarray) -> np.ndarray | None:
                # an output requested into a region is copied there from its rows: one copy, no bytes
                p = to_regions.get(out_name)
                if p is None or p.shm is None or rows.dtype != _numpy_dtype(p.spec, p.spec.datatype):
                    return None
                what = f"model '{spec.name}' output '{p.name}'"
                dst = region(p.shm.region).write_array(what, p.shm.offset, rows, p.shm.byte_size)
                written.add(out_name)
                return dst

            results = self.dp.infer(name, inputs, outputs=wanted, timeout=timeout,
                                    queue_timeout=_timeout(request, None), cancel=cancel,
                                    output_sink=into_region if to_regions else None, priority=priority,
                                    tenant=tenant, external=external or None)
            written.update(out_name for (kind, out_name), place in external.items()
                           if kind == "output" and place.written)
            del inputs  # views of shared memory must not outlive the regions' references
            resp = into if into is not None else self.ModelInferResponse()
            self._encode_outputs(spec, request, out_plan, results, region, resp, written)
            del results
            return resp

    def _tenant(self, context: grpc.ServicerContext) -> str | None:
        """The `kernelport-tenant` header, or the tenant the call's bearer token is bound to."""
        claimed = _tenant_header(context)
        if self.tokens is None or not self.tokens.tenants:
            return claimed
        return auth.request_tenant(self.tokens, context.invocation_metadata(), claimed)

    def _model_plan(self, name: str, spec: Any, info: Any) -> _ModelPlan:
        plan = self._plans.get(name)
        if plan is None or plan.spec is not spec or plan.info is not info:  # first use, or reloaded
            plan = _ModelPlan.build(spec, info)
            self._plans[name] = plan
        return plan

    def _fast_infer(
        self,
        plan: _ModelPlan,
        request: Any,
        checked: tuple[list[np.ndarray], int, tuple[tuple[int, ...], ...]],
        outs: tuple[tuple[_OutputPlan, ...], list[str] | None],
        deadline_s: float | None,
        into: Message | None,
        cancel: Cancellation | None,
        tenant: str | None,
    ) -> Message:
        """The common request, checked once against the cached plan: raw tensors in the message, no
        shared memory, no BYTES. The data plane does not validate it a second time."""
        arrays, n, shapes = checked
        out_plan, wanted = outs
        priority = 0
        if len(request.parameters):
            timeout, queue_timeout = _timeout(request, deadline_s), _timeout(request, None)
            priority, tenant = _schedule_policy(request, tenant, plan.spec.name)
        else:
            timeout, queue_timeout = (None if deadline_s is None else max(0.0, deadline_s)), None
            tenant = check_tenant(tenant, plan.spec.name)
        results = self.dp.infer_checked(plan.spec.name, plan.info, arrays, n, shapes, outputs=wanted,
                                        timeout=timeout, queue_timeout=queue_timeout, cancel=cancel,
                                        output_sink=_raw_output, priority=priority, tenant=tenant)
        resp = into if into is not None else self.ModelInferResponse()
        resp.model_name = plan.spec.name
        resp.model_version = request.model_version or "1"
        resp.id = request.id
        add = resp.outputs.add
        raw: list[bytes] = []
        for p in out_plan:
            data, shape = results[p.name]
            add(name=p.name, datatype=p.spec.datatype, shape=shape)
            raw.append(data)
        resp.raw_output_contents.extend(raw)
        return resp

    def _decode_inputs(
        self, spec: Any, request: Any, region: Callable[[str], SharedMemoryRegion],
        shm_inputs: dict[str, _ShmRef] | None = None,
    ) -> dict[str, np.ndarray]:
        """The request's inputs as arrays (views of their regions for those in shared memory, whose
        references go in `shm_inputs` when given)."""
        model = spec.name
        by_name = {t.name: t for t in spec.inputs}
        batching = spec.max_batch_size > 0
        tensors = list(request.inputs)
        raws = list(request.raw_input_contents)
        shm_refs = [_shm_ref(t.parameters, f"model '{model}' input '{t.name}'") for t in tensors]

        # Which raw entry belongs to which input: one per input, or one per input not in shared memory.
        raw_for: list[bytes | None] = [None] * len(tensors)
        if raws:
            if any(t.HasField("contents") for t in tensors):
                raise InvalidInputError(
                    f"model '{model}': contents and raw_input_contents cannot be mixed in one request"
                )
            plain = [i for i, ref in enumerate(shm_refs) if ref is None]
            if len(raws) == len(tensors):
                for i in plain:
                    raw_for[i] = raws[i]
            elif len(raws) == len(plain):
                for i, raw in zip(plain, raws):
                    raw_for[i] = raw
            else:
                raise InvalidInputError(
                    f"model '{model}': raw_input_contents has {len(raws)} entries, expected one per input "
                    f"({len(tensors)})"
                )

        decoded: dict[str, np.ndarray] = {}
        batch: int | None = None
        for i, t in enumerate(tensors):
            what = f"model '{model}' input '{t.name}'"
            if t.name in decoded:
                raise InvalidInputError(f"{what}: given more than once")
            ts = by_name.get(t.name)
            if ts is None:
                raise InvalidInputError(
                    f"model '{model}': unknown input '{t.name}' (inputs: {', '.join(by_name) or 'none'})"
                )
            shape = [int(d) for d in t.shape]
            expected = ([-1] if batching else []) + [int(d) for d in ts.dims]
            want = f"{ts.datatype} {_fmt_shape(expected)}"
            got = f"{t.datatype} {_fmt_shape(shape)}"
            if t.datatype != ts.datatype:
                raise InvalidInputError(f"{what}: expected {want}, got {got}")
            if any(d < 0 for d in shape):
                raise InvalidInputError(f"{what}: shape must be non-negative, got {_fmt_shape(shape)}")
            if len(shape) != len(expected) or any(e != -1 and e != s for e, s in zip(expected, shape)):
                raise InvalidInputError(f"{what}: expected {want}, got {got}")
            if batching:
                if shape[0] > spec.max_batch_size:
                    raise InvalidInputError(
                        f"{what}: batch size {shape[0]} exceeds the model's max_batch_size {spec.max_batch_size}"
                    )
                if shape[0] < 1:
                    raise InvalidInputError(f"{what}: batch size must be at least 1, got {shape[0]}")
                if batch is not None and shape[0] != batch:
                    raise InvalidInputError(
                        f"{what}: batch size {shape[0]} differs from the other inputs' {batch}"
                    )
                batch = shape[0]
            count = math.prod(shape)  # Python ints: exact, no overflow
            decoded[t.name] = self._decode_one(what, ts, t, shape, count, raw_for[i], shm_refs[i], region)
            ref = shm_refs[i]
            if shm_inputs is not None and ref is not None:
                shm_inputs[t.name] = ref

        missing = [t.name for t in spec.inputs if t.name not in decoded and not getattr(t, "optional", False)]
        if missing:
            raise InvalidInputError(
                f"model '{model}': missing input{'s' if len(missing) > 1 else ''} "
                + ", ".join(f"'{n}'" for n in missing)
                + f" (expected {', '.join(t.name for t in spec.inputs)}; got {', '.join(decoded) or 'none'})"
            )
        return decoded

    def _decode_one(
        self,
        what: str,
        ts: Any,
        t: Any,
        shape: list[int],
        count: int,
        raw: bytes | None,
        ref: _ShmRef | None,
        region: Callable[[str], SharedMemoryRegion],
    ) -> np.ndarray:
        datatype = ts.datatype
        is_bytes = datatype == "BYTES"
        if ref is not None:
            if t.HasField("contents"):
                raise InvalidInputError(f"{what}: contents and a shared memory region cannot both be given")
            if not is_bytes:
                _check_byte_size(what, count, datatype, ref.byte_size, "shared memory byte size")
            view = region(ref.region).read(what, ref.offset, ref.byte_size)
            if is_bytes:
                # Parse from a private copy: the client can rewrite the region while we read it.
                private = region(ref.region).copy_out(what, ref.offset, ref.byte_size)
                return _parse_bytes_tensor(what, bytes(private), count).reshape(shape)
            arr = np.frombuffer(view, dtype=_numpy_dtype(ts, datatype))
            return arr.reshape(shape)
        if raw is not None:
            if is_bytes:
                return _parse_bytes_tensor(what, raw, count).reshape(shape)
            _check_byte_size(what, count, datatype, len(raw), "raw_input_contents")
            return np.frombuffer(raw, dtype=_numpy_dtype(ts, datatype)).reshape(shape)
        if t.HasField("contents"):
            return _decode_typed(what, ts, t.contents, shape, count)
        if count == 0:
            return np.empty(shape, dtype=_numpy_dtype(ts, datatype))
        raise InvalidInputError(
            f"{what}: no data (expected raw_input_contents, contents or a shared memory region)"
        )

    def _plan_outputs(self, spec: Any, request: Any) -> list[_OutputPlan]:
        model = spec.name
        by_name = {t.name: t for t in spec.outputs}
        if not len(request.outputs):
            return [_OutputPlan(t.name, t, None) for t in spec.outputs]
        plan: list[_OutputPlan] = []
        seen: set[str] = set()
        for o in request.outputs:
            what = f"model '{model}' output '{o.name}'"
            ts = by_name.get(o.name)
            if ts is None:
                raise InvalidInputError(
                    f"model '{model}': unknown output '{o.name}' (outputs: {', '.join(by_name) or 'none'})"
                )
            if o.name in seen:
                raise InvalidInputError(f"{what}: requested more than once")
            seen.add(o.name)
            if "classification" in o.parameters:
                raise StatusError("UNIMPLEMENTED", f"{what}: the classification extension is not supported")
            plan.append(_OutputPlan(o.name, ts, _shm_ref(o.parameters, what)))
        return plan

    def _encode_outputs(
        self,
        spec: Any,
        request: Any,
        plan: list[_OutputPlan],
        results: dict[str, np.ndarray],
        region: Callable[[str], SharedMemoryRegion],
        resp: Any,
        written: AbstractSet[str] = frozenset(),
    ) -> None:
        """`written`: outputs already in their regions (copied there from the rows)."""
        resp.model_name = spec.name
        resp.model_version = request.model_version or "1"
        resp.id = request.id
        raw: list[bytes] = []
        any_plain = any(p.shm is None for p in plan)
        for p in plan:
            what = f"model '{spec.name}' output '{p.name}'"
            arr = results.get(p.name)
            if arr is None:
                raise StatusError("INTERNAL", f"{what}: the model produced no such output")
            arr = np.asarray(arr)
            datatype = p.spec.datatype
            if datatype == "BYTES":
                data: bytes | memoryview = _serialize_bytes_tensor(arr)
            else:
                dtype = _numpy_dtype(p.spec, datatype)
                if arr.dtype != dtype:
                    arr = arr.astype(dtype)
                data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
            resp.outputs.add(name=p.name, datatype=datatype, shape=[int(d) for d in arr.shape])
            if p.shm is not None:
                if p.name not in written:
                    region(p.shm.region).write(what, p.shm.offset, data, p.shm.byte_size)
                if any_plain:
                    raw.append(b"")
            else:
                raw.append(bytes(data))
        resp.raw_output_contents.extend(raw)


@dataclass(frozen=True)
class _OutputPlan:
    name: str
    spec: Any
    shm: _ShmRef | None


_MAX_OUTPUT_SELECTIONS = 64  # distinct requested-output lists remembered per model


@dataclass
class _ModelPlan:
    """What the fast path needs of one model, made once per loaded spec: where each input goes, its
    datatype, dtype, dims and item size; the default output list. `fast` is False for models with
    BYTES (or dtype-less) tensors, which always take the general path."""

    spec: Any
    info: Any
    fast: bool
    batching: bool
    max_batch: int
    inputs: dict[str, tuple[int, str, np.dtype[Any], tuple[int, ...], int]]
    outputs: dict[str, _OutputPlan]
    all_outputs: tuple[tuple[_OutputPlan, ...], list[str] | None]
    selections: dict[tuple[str, ...], tuple[tuple[_OutputPlan, ...], list[str] | None]]

    @classmethod
    def build(cls, spec: Any, info: Any) -> _ModelPlan:
        tensors = list(spec.inputs) + list(spec.outputs)
        fast = all(t.datatype != "BYTES" and getattr(t, "dtype", None) is not None for t in tensors)
        inputs: dict[str, tuple[int, str, np.dtype[Any], tuple[int, ...], int]] = {}
        if fast:
            for i, t in enumerate(spec.inputs):
                dtype = np.dtype(t.dtype)
                inputs[t.name] = (i, t.datatype, dtype, tuple(int(d) for d in t.dims), dtype.itemsize)
        outputs = {t.name: _OutputPlan(t.name, t, None) for t in spec.outputs}
        return cls(spec, info, fast, spec.max_batch_size > 0, spec.max_batch_size, inputs, outputs,
                   (tuple(outputs.values()), None), {})


def _raw_output(name: str, rows: np.ndarray) -> tuple[bytes, tuple[int, ...]]:
    """The fast path's output sink: the response bytes straight from the rows (one copy)."""
    return rows.tobytes(), rows.shape


def _fast_inputs(
    plan: _ModelPlan, request: Any
) -> tuple[list[np.ndarray], int, tuple[tuple[int, ...], ...]] | None:
    """The request's inputs as arrays over its raw bytes, in model order, when the request is the common
    kind and right in every respect; None otherwise (the general path then decodes it, or says what is
    wrong with it)."""
    tensors = request.inputs
    raws = request.raw_input_contents
    k = len(plan.inputs)
    if len(tensors) != k or len(raws) != k:
        return None
    arrays: list[Any] = [None] * k
    shapes: list[Any] = [None] * k
    batch = -1
    for t, raw in zip(tensors, raws):
        entry = plan.inputs.get(t.name)
        if entry is None:
            return None
        i, datatype, dtype, dims, itemsize = entry
        if arrays[i] is not None or t.datatype != datatype or len(t.parameters) or t.HasField("contents"):
            return None
        shape = tuple(t.shape)
        if plan.batching:
            if len(shape) != len(dims) + 1:
                return None
            b = shape[0]
            if b < 1 or b > plan.max_batch or (batch != -1 and b != batch):
                return None
            batch = b
            sample = shape[1:]
        else:
            if len(shape) != len(dims):
                return None
            sample = shape
        count = 1
        for d, e in zip(sample, dims):
            if d < 1 or (e != -1 and d != e):
                return None
            count *= d
        if plan.batching:
            count *= batch
        if len(raw) != count * itemsize:
            return None
        arrays[i] = np.frombuffer(raw, dtype=dtype).reshape(shape)
        shapes[i] = sample
    return arrays, (batch if plan.batching else 1), tuple(shapes)


def _fast_outputs(
    plan: _ModelPlan, request: Any
) -> tuple[tuple[_OutputPlan, ...], list[str] | None] | None:
    """The outputs to return, when none goes to shared memory and all are known; None otherwise."""
    if not len(request.outputs):
        return plan.all_outputs
    names: list[str] = []
    for o in request.outputs:
        if len(o.parameters):
            return None
        names.append(o.name)
    key = tuple(names)
    found = plan.selections.get(key)
    if found is None:
        if len(set(key)) != len(key) or any(n not in plan.outputs for n in key):
            return None
        found = (tuple(plan.outputs[n] for n in key), names)
        if len(plan.selections) < _MAX_OUTPUT_SELECTIONS:
            plan.selections[key] = found
    return found


def _index_field(entry: Any, index: int, attr: str) -> Any:
    """A repository index entry: a (name, version, state, reason) tuple or an object with those attributes."""
    if isinstance(entry, (tuple, list)):
        return entry[index] if index < len(entry) else None
    return getattr(entry, attr, None)


def _timeout(request: Any, deadline_s: float | None) -> float | None:
    """The tighter of the request's "timeout" parameter (microseconds, as Triton) and the gRPC deadline."""
    timeout = deadline_s
    if "timeout" in request.parameters:
        value = _param_value(request.parameters["timeout"])
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            t = float(value) / 1e6
            timeout = t if timeout is None else min(timeout, t)
    if timeout is not None:
        timeout = max(0.0, timeout)
    return timeout


def _check_byte_size(what: str, count: int, datatype: str, got: int, source: str) -> None:
    expected = count * _ITEMSIZE[datatype]
    if got != expected:
        raise InvalidInputError(
            f"{what}: {source} holds {got} bytes, expected {expected} ({count} x {datatype})"
        )


def _decode_typed(what: str, ts: Any, contents: Any, shape: list[int], count: int) -> np.ndarray:
    datatype = ts.datatype
    field = _TYPED_FIELD.get(datatype)
    if field is None:
        raise InvalidInputError(f"{what}: {datatype} has no typed contents field; send raw_input_contents")
    others = [f for f in _TYPED_FIELDS if f != field and len(getattr(contents, f))]
    if others:
        raise InvalidInputError(f"{what}: {datatype} data goes in contents.{field}, got {', '.join(others)}")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInputError(
            f"{what}: contents.{field} holds {len(values)} values, expected {count} for shape {_fmt_shape(shape)}"
        )
    if datatype == "BYTES":
        arr = np.empty(count, dtype=np.object_)
        arr[:] = list(values)
        return arr.reshape(shape)
    wide = np.fromiter(values, dtype=_TYPED_WIDE[field], count=count)
    dtype = _numpy_dtype(ts, datatype)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        lo, hi = int(wide.min()), int(wide.max())
        if lo < info.min or hi > info.max:
            raise InvalidInputError(f"{what}: values [{lo}, {hi}] do not fit {datatype}")
    return wide.astype(dtype, copy=False).reshape(shape)


def _fill_model_statistics(ms: Any, name: str, snap: Any) -> None:
    def put(dst: Any, src: Any) -> None:
        dst.count = max(0, int(getattr(src, "count", 0)))
        dst.ns = max(0, int(getattr(src, "ns", 0)))

    ms.name = getattr(snap, "name", None) or name
    ms.version = str(getattr(snap, "version", None) or "1")
    ms.last_inference = max(0, int(getattr(snap, "last_inference_ms", 0)))
    ms.inference_count = max(0, int(getattr(snap, "inference_count", 0)))
    ms.execution_count = max(0, int(getattr(snap, "execution_count", 0)))
    st = ms.inference_stats
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        put(getattr(st, field), getattr(snap, field, None))
    batches = getattr(snap, "batch_stats", ())
    if isinstance(batches, dict):
        batches = [batches[k] for k in sorted(batches)]
    for b in batches:
        out = ms.batch_stats.add(batch_size=max(0, int(b.batch_size)))
        put(out.compute_input, b.compute_input)
        put(out.compute_infer, b.compute_infer)
        put(out.compute_output, b.compute_output)


# The tensor wire rules shared with the HTTP front end (kernelport.protocol.http_frontend), under public names.
ITEMSIZE = _ITEMSIZE
check_byte_size = _check_byte_size
fmt_shape = _fmt_shape
numpy_dtype = _numpy_dtype
parse_bytes_tensor = _parse_bytes_tensor
serialize_bytes_tensor = _serialize_bytes_tensor
server_version = _server_version


# ------------------------------------------------------------------------------------------------------
# the server


class GrpcFrontendServer(grpc.Server):
    """The started gRPC server, with the port it bound and a `stop` that also releases the servicer.

    Delegates to the `grpc.Server` that `grpc.server()` made; `stop` additionally unregisters every client
    shared-memory region (each unmapped when its last request finishes) and stops the stream workers.
    """

    def __init__(self, server: grpc.Server, servicer: InferenceServicer, port: int) -> None:
        self._server = server
        self.servicer = servicer
        self.port = port

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None) -> threading.Event:
        event = self._server.stop(grace)
        self.servicer.close()
        return event

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


GRPC_ENGINES = ("native", "grpcio")
DEFAULT_GRPC_ENGINE = "native"
GRPC_ENGINE_ENV = "KERNELPORT_GRPC_ENGINE"


def grpc_engine(engine: str | None = None) -> str:
    """The gRPC engine to use: `engine`, else $KERNELPORT_GRPC_ENGINE, else the default."""
    chosen = engine or os.environ.get(GRPC_ENGINE_ENV) or DEFAULT_GRPC_ENGINE
    if chosen not in GRPC_ENGINES:
        raise ConfigError(f"unknown gRPC engine '{chosen}' (expected one of: {', '.join(GRPC_ENGINES)})")
    return chosen


def serve_grpc(
    dataplane: DataPlane,
    host: str = "127.0.0.1",
    port: int = 8001,
    max_message_bytes: int = 2**31 - 1,
    workers: int = DEFAULT_WORKERS,
    *,
    allow_client_shm: bool = False,
    reserved_shm_prefixes: tuple[str, ...] | None = None,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    engine: str | None = None,
) -> GrpcFrontendServer | NativeGrpcServer:
    """Start the gRPC front end on host:port and return the started server (a `grpc.Server`).

    `workers` bounds the RPCs served at once; a unary infer holds one while it waits for its batch, so it
    is also the most remote requests that can share one batch. `port=0` picks a free port (the returned
    server's `port` says which). `allow_client_shm` enables the system shared-memory extension;
    `reserved_shm_prefixes` are key prefixes of the server's own segments, which clients may never
    register (default: the registry's). `credentials` (`kernelport.protocol.auth.server_credentials`)
    makes the port TLS only; `interceptors` run before every RPC (`auth.BearerTokenInterceptor`).
    `engine` is "native" (the HTTP/2 transport in C, `grpc_native`) or "grpcio" (Python grpcio's server);
    None: the `KERNELPORT_GRPC_ENGINE` environment variable, else the default (`grpc_engine`). TLS is
    served by grpcio whichever engine is asked for. Raises OSError when the address cannot be bound.
    """
    chosen = grpc_engine(engine)
    if chosen == "native" and credentials is not None:
        log.info("gRPC over TLS: served by the grpcio engine (the native engine is plaintext only)")
        chosen = "grpcio"
    registry = (
        SharedMemoryRegistry(allowed=allow_client_shm)
        if reserved_shm_prefixes is None
        else SharedMemoryRegistry(allowed=allow_client_shm, reserved_key_prefixes=reserved_shm_prefixes)
    )
    servicer = InferenceServicer(dataplane, registry, stream_workers=workers)
    servicer.tokens = next((i.table for i in interceptors if isinstance(i, auth.BearerTokenInterceptor)), None)
    if chosen == "native":
        from kernelport.protocol.grpc_native import NativeGrpcServer

        try:
            native = NativeGrpcServer(servicer, host, port, max_message_bytes, workers, interceptors)
        except (OSError, ValueError) as exc:
            servicer.close()
            raise OSError(f"cannot listen for gRPC on {host}:{port}: {exc}") from None
        native.start()
        log.info(
            "gRPC front end listening on %s:%d (native engine, plaintext, %d workers, max message %d bytes, "
            "client shared memory %s)", host, native.port, workers, max_message_bytes,
            "allowed" if allow_client_shm else "refused",
        )  # fmt: skip
        return native
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it silently
    ]
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kp-grpc"),
        handlers=servicer.handlers(),
        interceptors=list(interceptors),
        options=options,
    )
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        servicer.close()
        raise OSError(f"cannot listen for gRPC on {address}: {exc}") from None
    if bound == 0:
        servicer.close()
        raise OSError(f"cannot listen for gRPC on {address}")
    server.start()
    log.info(
        "gRPC front end listening on %s:%d (%s, %d workers, max message %d bytes, client shared memory %s)",
        host, bound, "TLS" if credentials is not None else "plaintext", workers, max_message_bytes,
        "allowed" if allow_client_shm else "refused",
    )  # fmt: skip
    return GrpcFrontendServer(server, servicer, bound)
