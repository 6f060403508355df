"""Errors a user of KernelPort sees. Each maps to one gRPC status code (see `grpc_code`)."""

from __future__ import annotations


class KernelPortError(Exception):
    """Base of every error KernelPort raises on purpose."""

    grpc_code = "INTERNAL"


class ConfigError(KernelPortError):
    """A model configuration (config.pbtxt) or repository layout is invalid."""

    grpc_code = "INVALID_ARGUMENT"


class ModelNotFoundError(KernelPortError):
    grpc_code = "NOT_FOUND"


class InvalidInputError(KernelPortError):
    """A request's tensors do not match the model (name, dtype, shape, size)."""

    grpc_code = "INVALID_ARGUMENT"


class ModelNotReadyError(KernelPortError):
    grpc_code = "UNAVAILABLE"


class ServerUnavailableError(KernelPortError):
    """The server (or the worker that held the request) is gone."""

    grpc_code = "UNAVAILABLE"


class InferTimeoutError(KernelPortError):
    grpc_code = "DEADLINE_EXCEEDED"


class RequestCancelledError(KernelPortError):
    """The request was cancelled by its caller (a gRPC cancel or deadline) and was not run."""

    grpc_code = "CANCELLED"


class PermissionDeniedError(KernelPortError):
    """The caller is authenticated but may not do this (a token bound to another tenant)."""

    grpc_code = "PERMISSION_DENIED"


class QueueFullError(KernelPortError):
    grpc_code = "RESOURCE_EXHAUSTED"


class InferFailedError(KernelPortError):
    """The backend raised while running the batch that held this request."""

    grpc_code = "INTERNAL"


class BackendUnavailableError(KernelPortError):
    """The framework a model needs is not installed (or has no device)."""

    grpc_code = "UNAVAILABLE"
