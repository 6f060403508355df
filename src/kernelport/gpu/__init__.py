"""The GPU path: device detection and inventory, CUDA IPC handles, placement of workers on GPUs and MIG
slices, stream and buffer pools, lanes whose rows live in device memory, and DLPack helpers.

Nothing here imports a framework or initialises CUDA at import time: the server process imports this package
(placement, handle parsing) and must stay free of CUDA contexts. Functions that need CUDA import cupy or torch
when called and raise `CudaUnavailableError` (UNAVAILABLE) with the reason when it is absent.
"""

from kernelport.gpu.cuda import CudaUnavailableError, cuda_available, cuda_unavailable_reason, device_inventory
from kernelport.gpu.ipc import IpcHandleError, IpcMemHandle
from kernelport.gpu.placement import DeviceMemoryError, PlacementError, WorkerPlacement, place_instances

__all__ = [
    "CudaUnavailableError",
    "DeviceMemoryError",
    "IpcHandleError",
    "IpcMemHandle",
    "PlacementError",
    "WorkerPlacement",
    "cuda_available",
    "cuda_unavailable_reason",
    "device_inventory",
    "place_instances",
]
