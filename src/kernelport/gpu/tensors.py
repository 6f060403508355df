"""Tensors from any framework, by DLPack: which device they live on, host views, device views of rows.

`Client.infer` may be given numpy arrays, torch tensors or cupy arrays. Every one of them says where its memory
is through `__dlpack_device__()` (a (device type, device id) pair; DLPack's codes: 1 CPU, 2 CUDA, 3 CUDA
pinned host, 13 CUDA managed). Host memory (CPU, pinned) is read in place as numpy (`np.from_dlpack`, no
copy); CUDA memory is either written into device rows (`copy_to_device`, on the caller's stream) or, where the
model's rows are on the host, copied to host once (`to_host`), which is the fallback and says so in its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kernelport.errors import InvalidInputError
from kernelport.gpu.cuda import CudaUnavailableError

__all__ = [
    "DL_CPU",
    "DL_CUDA",
    "DL_CUDA_HOST",
    "DL_CUDA_MANAGED",
    "as_host_array",
    "device_array",
    "dlpack_device",
    "is_device_tensor",
    "split_by_device",
    "to_host",
    "to_torch",
]

DL_CPU, DL_CUDA, DL_CUDA_HOST, DL_CUDA_MANAGED = 1, 2, 3, 13
_HOST_TYPES = (DL_CPU, DL_CUDA_HOST)


def dlpack_device(obj: Any) -> tuple[int, int] | None:
    """(device type, device id) of a DLPack-capable tensor, None for anything else."""
    if isinstance(obj, np.ndarray):
        return (DL_CPU, 0)
    fn = getattr(obj, "__dlpack_device__", None)
    if fn is None:
        return None
    kind, dev = fn()
    return int(kind), int(dev)


def is_device_tensor(obj: Any) -> bool:
    """True for a tensor in CUDA device (or managed) memory."""
    d = dlpack_device(obj)
    return d is not None and d[0] in (DL_CUDA, DL_CUDA_MANAGED)


def as_host_array(name: str, obj: Any) -> np.ndarray:
    """A numpy view (no copy) of a host tensor: numpy itself, a CPU torch tensor, pinned memory.
    InvalidInputError for a device tensor (use `to_host` to copy) or for something that is not a tensor."""
    if isinstance(obj, np.ndarray):
        return obj
    d = dlpack_device(obj)
    if d is None:
        return np.asarray(obj)  # lists, scalars: numpy decides, as before
    if d[0] not in _HOST_TYPES:
        raise InvalidInputError(f"input '{name}': a tensor on device type {d[0]} (CUDA) cannot be read as host "
                                f"memory; it goes to device rows, or is copied with to_host()")
    if getattr(obj, "requires_grad", False):
        obj = obj.detach()
    return np.from_dlpack(obj)


def to_host(obj: Any) -> np.ndarray:
    """A host copy of a CUDA tensor (torch or cupy), synchronised with the tensor's stream; host tensors as
    `as_host_array`. The fallback for models whose rows are in host memory."""
    if not is_device_tensor(obj):
        return as_host_array("tensor", obj)
    mod = type(obj).__module__.split(".")[0]
    if mod == "torch":
        return obj.detach().cpu().numpy()  # .cpu() synchronises with the tensor's stream
    if mod == "cupy":
        import cupy

        return cupy.asnumpy(obj)
    raise CudaUnavailableError(f"no way to copy a {type(obj).__name__} from the device (needs torch or cupy)")


def split_by_device(inputs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(host tensors, device tensors) by name; a request mixing the two is fine (each goes its own way)."""
    host: dict[str, Any] = {}
    device: dict[str, Any] = {}
    for name, value in inputs.items():
        (device if is_device_tensor(value) else host)[name] = value
    return host, device


def device_array(ptr: int, shape: tuple[int, ...], dtype: Any, owner: Any, ordinal: int = 0) -> Any:
    """A cupy array over `ptr` (device memory `owner` keeps alive): a device row viewed without a copy."""
    try:
        import cupy
    except ImportError:
        raise CudaUnavailableError("device rows are not available: cupy is not installed") from None
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, owner, ordinal)
    return cupy.ndarray(shape, dt, cupy.cuda.MemoryPointer(mem, 0))


def to_torch(arr: Any) -> Any:
    """A torch tensor over the same memory (DLPack; no copy)."""
    import torch

    return torch.from_dlpack(arr)


def copy_to_device(dst: Any, src: Any, stream: Any = None) -> None:
    """Copy `src` (torch or cupy, any device, or numpy) into the cupy array `dst` on `stream` (cupy's current
    stream when None). Shapes and dtypes must agree exactly (no broadcast, no cast)."""
    import cupy

    if tuple(src.shape) != tuple(dst.shape) or np.dtype(str(src.dtype).replace("torch.", "")) != dst.dtype:
        raise InvalidInputError(f"expected {dst.dtype} {list(dst.shape)}, got {src.dtype} {list(src.shape)}")
    with stream if stream is not None else cupy.cuda.get_current_stream():
        if isinstance(src, np.ndarray):
            dst.set(src)
        else:
            # torch tensors export their stream through DLPack's protocol: from_dlpack orders against it
            dst[...] = cupy.from_dlpack(src)


def infer_with_device_tensors(client: Any, model: str, inputs: Mapping[str, Any], outputs: Any = None,
                              device: str | None = None, **kw: Any) -> dict[str, Any]:
    """`client.infer` for inputs that may be torch or cupy CUDA tensors, on a model whose rows are in host
    memory: device inputs are copied to host once (`to_host`), and the outputs come back as tensors of the
    first device input's kind on its device (or on `device`, "cuda:N", as torch tensors), numpy otherwise.
    The zero-copy alternative is a device lane (kernelport.gpu.device_lane)."""
    host = {name: to_host(v) if is_device_tensor(v) else v for name, v in inputs.items()}
    results: dict[str, Any] = client.infer(model, host, outputs, **kw)
    like = next((v for v in inputs.values() if is_device_tensor(v)), None)
    if device is None and like is None:
        return results
    if like is not None and device is None and type(like).__module__.split(".")[0] == "cupy":
        import cupy

        with cupy.cuda.Device(dlpack_device(like)[1]):  # type: ignore[index]
            return {k: cupy.asarray(v) for k, v in results.items()}
    import torch

    target = device or f"cuda:{dlpack_device(like)[1]}"  # type: ignore[index]
    return {k: torch.from_numpy(v).to(target, non_blocking=False) for k, v in results.items()}
