"""KernelPort: an inference server that runs every model on its own framework's kernels."""

from __future__ import annotations

__version__ = "0.1.0"

from kernelport.client.client import AsyncClient, AsyncInferRequest, Client, InferRequest
from kernelport.errors import (
    ConfigError,
    InferFailedError,
    InferTimeoutError,
    InvalidInputError,
    KernelPortError,
    ModelNotFoundError,
    ModelNotReadyError,
    QueueFullError,
    RequestCancelledError,
    ServerUnavailableError,
)

__all__ = [
    "AsyncClient",
    "AsyncInferRequest",
    "Client",
    "ConfigError",
    "InferFailedError",
    "InferRequest",
    "InferTimeoutError",
    "InvalidInputError",
    "KernelPortError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "QueueFullError",
    "RequestCancelledError",
    "ServerUnavailableError",
    "__version__",
]
