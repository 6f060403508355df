"""Is there CUDA here, and which devices: asked lazily, without creating a CUDA context in the server.

Two questions with different costs:
- `cuda_unavailable_reason()` / `cuda_available()`: cheap and context-free. A CUDA stack needs the driver's
  device nodes (`/dev/nvidia<N>`) and a Python binding (cupy or torch) importable. It does not import either
  binding, so the server process may ask. `probe=True` goes further and asks cupy (or torch) for the device
  count, which initialises the CUDA driver in the calling process: workers and scripts only.
- `device_inventory()`: the GPUs and their MIG slices with total and free memory, through NVML (the driver's
  management library; no CUDA context), falling back to torch.cuda in processes that may initialise CUDA.

Every function that needs CUDA raises `CudaUnavailableError` (gRPC UNAVAILABLE) naming what is missing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable
from typing import Any

from kernelport.errors import KernelPortError

__all__ = [
    "CudaUnavailableError",
    "cuda_available",
    "cuda_unavailable_reason",
    "device_inventory",
    "require_cuda",
]

log = logging.getLogger(__name__)


class CudaUnavailableError(KernelPortError):
    """Something needs CUDA and this machine (or this process's environment) has none."""

    grpc_code = "UNAVAILABLE"


def _device_nodes(dev: str = "/dev") -> list[str]:
    try:
        names = os.listdir(dev)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("nvidia") and n[6:].isdigit())


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cuda_unavailable_reason(*, probe: bool = False, bindings: Iterable[str] = ("cupy", "torch"),
                            dev: str = "/dev") -> str | None:
    """None when CUDA looks usable; else why not, in words a user can act on.

    `probe`: also ask the binding for a device count (initialises CUDA in this process; never in the
    server). `bindings`: the Python bindings that would do (the first importable one is probed)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU from this process"
    if not _device_nodes(dev):
        return "no CUDA device (the NVIDIA driver's device nodes are absent)"
    names = tuple(bindings)
    found = [n for n in names if _importable(n)]
    if not found:
        return f"no CUDA binding installed (needs one of: {', '.join(names)})"
    if not probe:
        return None
    return _probe(found[0])


def _probe(binding: str) -> str | None:
    try:
        if binding == "cupy":
            import cupy

            count = int(cupy.cuda.runtime.getDeviceCount())
        else:
            import torch

            if not torch.cuda.is_available():
                return f"torch {torch.__version__} sees no CUDA device"
            count = int(torch.cuda.device_count())
    except Exception as e:  # cupy.cuda.runtime.CUDARuntimeError, ImportError of a broken install, ...
        return f"{binding} cannot use CUDA: {e}"
    if count < 1:
        return f"{binding} sees no CUDA device"
    return None


def cuda_available(*, probe: bool = False) -> bool:
    return cuda_unavailable_reason(probe=probe) is None


def require_cuda(what: str, *, probe: bool = False, bindings: Iterable[str] = ("cupy", "torch")) -> None:
    """Raise CudaUnavailableError("<what> is not available: <reason>") unless CUDA is usable."""
    reason = cuda_unavailable_reason(probe=probe, bindings=bindings)
    if reason is not None:
        raise CudaUnavailableError(f"{what} is not available: {reason}")


# ------------------------------------------------------------------------------------------ inventory


def device_inventory(*, allow_cuda_init: bool = False) -> list[dict[str, Any]]:
    """The GPUs this machine has, as plain data (what `kernelport.gpu.placement` takes):

        {"index": 0, "uuid": "GPU-…", "name": "NVIDIA H200", "total_memory": bytes, "free_memory": bytes,
         "mig_enabled": bool, "mig": [{"uuid": "MIG-…", "total_memory": bytes, "free_memory": bytes}, …]}

    A GPU in MIG mode runs CUDA work only in its slices: with MIG enabled and no slice made, it offers none.

    Indices are NVML's (PCI bus order, which CUDA follows under CUDA_DEVICE_ORDER=PCI_BUS_ID; placement
    passes UUIDs to workers, so the two orders never need to agree). NVML first (no CUDA context); then,
    with `allow_cuda_init` (workers, scripts), torch.cuda. Empty when there is no GPU."""
    if not _device_nodes():
        return []
    inventory = _nvml_inventory()
    if inventory is None and allow_cuda_init:
        inventory = _torch_inventory()
    return inventory or []


def _nvml_inventory() -> list[dict[str, Any]] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded
        log.info("NVML did not start (%s)", e)
        return None
    try:
        out = []
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append({"index": i, "uuid": _text(pynvml.nvmlDeviceGetUUID(h)),
                        "name": _text(pynvml.nvmlDeviceGetName(h)), "total_memory": int(mem.total),
                        "free_memory": int(mem.free), "mig_enabled": _nvml_mig_enabled(pynvml, h),
                        "mig": _nvml_mig(pynvml, h)})
        return out
    except Exception as e:
        log.info("NVML could not list the devices (%s)", e)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _nvml_mig_enabled(nvml: Any, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception:  # NVMLError_NotSupported: not a MIG-capable GPU
        return False
    return bool(current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1))


def _nvml_mig(nvml: Any, handle: Any) -> list[dict[str, Any]]:
    if not _nvml_mig_enabled(nvml, handle):
        return []
    slices = []
    for j in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
        try:
            mh = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
        except Exception:  # NVMLError_NotFound: an empty slot
            continue
        mem = nvml.nvmlDeviceGetMemoryInfo(mh)
        slices.append({"uuid": _text(nvml.nvmlDeviceGetUUID(mh)), "total_memory": int(mem.total),
                       "free_memory": int(mem.free)})
    return slices


def _torch_inventory() -> list[dict[str, Any]] | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        out = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            uuid = str(getattr(props, "uuid", ""))
            out.append({"index": i, "uuid": uuid if uuid.startswith(("GPU-", "MIG-")) or not uuid else f"GPU-{uuid}",
                        "name": props.name, "total_memory": int(total), "free_memory": int(free), "mig": []})
        return out
    except Exception as e:
        log.info("torch could not list the CUDA devices (%s)", e)
        return None


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
