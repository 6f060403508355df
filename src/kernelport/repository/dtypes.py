"""Tensor element types: config enum (TYPE_FP32 = 11) <-> KServe datatype ("FP32") <-> numpy dtype.

BF16 has a numpy dtype only where `ml_dtypes` is installed; elsewhere its numpy dtype is None and
its item size is still known (2), so buffers can be laid out without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DATATYPES",
    "DataTypeInfo",
    "config_type_to_datatype",
    "config_type_to_numpy",
    "datatype_info",
    "datatype_itemsize",
    "datatype_to_config_enum",
    "datatype_to_config_type",
    "datatype_to_numpy",
    "numpy_to_datatype",
    "ort_type_to_datatype",
]

try:
    import ml_dtypes

    _BF16: np.dtype[Any] | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # optional: only frameworks that produce bfloat16 need it
    _BF16 = None


@dataclass(frozen=True)
class DataTypeInfo:
    datatype: str  # KServe name, "FP32"
    config_type: str  # config enum name, "TYPE_FP32"
    config_enum: int  # config enum value, 11
    dtype: np.dtype[Any] | None  # None: BF16 without ml_dtypes
    itemsize: int  # bytes per element; 0 for BYTES (variable length)


def _info(datatype: str, config_type: str, enum: int, dtype: np.dtype[Any] | None, size: int) -> DataTypeInfo:
    return DataTypeInfo(datatype, config_type, enum, dtype, size)


_TABLE: tuple[DataTypeInfo, ...] = (
    _info("BOOL", "TYPE_BOOL", 1, np.dtype(np.bool_), 1),
    _info("UINT8", "TYPE_UINT8", 2, np.dtype(np.uint8), 1),
    _info("UINT16", "TYPE_UINT16", 3, np.dtype(np.uint16), 2),
    _info("UINT32", "TYPE_UINT32", 4, np.dtype(np.uint32), 4),
    _info("UINT64", "TYPE_UINT64", 5, np.dtype(np.uint64), 8),
    _info("INT8", "TYPE_INT8", 6, np.dtype(np.int8), 1),
    _info("INT16", "TYPE_INT16", 7, np.dtype(np.int16), 2),
    _info("INT32", "TYPE_INT32", 8, np.dtype(np.int32), 4),
    _info("INT64", "TYPE_INT64", 9, np.dtype(np.int64), 8),
    _info("FP16", "TYPE_FP16", 10, np.dtype(np.float16), 2),
    _info("FP32", "TYPE_FP32", 11, np.dtype(np.float32), 4),
    _info("FP64", "TYPE_FP64", 12, np.dtype(np.float64), 8),
    _info("BYTES", "TYPE_STRING", 13, np.dtype(np.object_), 0),
    _info("BF16", "TYPE_BF16", 14, _BF16, 2),
)

DATATYPES: tuple[str, ...] = tuple(i.datatype for i in _TABLE)

_BY_DATATYPE = {i.datatype: i for i in _TABLE}
_BY_CONFIG_TYPE = {i.config_type: i for i in _TABLE}
_BY_CONFIG_ENUM = {i.config_enum: i for i in _TABLE}
_BY_DTYPE = {i.dtype: i for i in _TABLE if i.dtype is not None}

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}


def datatype_info(datatype: str) -> DataTypeInfo:
    """Everything known about a KServe datatype ("FP32"); ValueError if it is not one."""
    try:
        return _BY_DATATYPE[datatype]
    except KeyError:
        raise ValueError(f"unknown datatype {datatype!r} (known: {', '.join(DATATYPES)})") from None


def _config_info(config_type: int | str) -> DataTypeInfo:
    info = (
        _BY_CONFIG_ENUM.get(config_type) if isinstance(config_type, int) else _BY_CONFIG_TYPE.get(config_type)
    )
    if info is None:
        raise ValueError(f"data type {config_type!r} is not a tensor type (TYPE_BOOL .. TYPE_BF16)")
    return info


def config_type_to_datatype(config_type: int | str) -> str:
    """`TYPE_FP32` or 11 -> "FP32"; TYPE_STRING -> "BYTES". TYPE_INVALID raises ValueError."""
    return _config_info(config_type).datatype


def config_type_to_numpy(config_type: int | str) -> np.dtype[Any] | None:
    """`TYPE_FP32` or 11 -> float32; TYPE_BF16 -> None without ml_dtypes."""
    return _config_info(config_type).dtype


def datatype_to_config_type(datatype: str) -> str:
    """KServe datatype to config enum name: "FP32" -> "TYPE_FP32"; "BYTES" -> "TYPE_STRING"."""
    return datatype_info(datatype).config_type


def datatype_to_config_enum(datatype: str) -> int:
    """KServe datatype to config enum value: "FP32" -> 11 (`inference.DataType.TYPE_FP32`)."""
    return datatype_info(datatype).config_enum


def datatype_to_numpy(datatype: str) -> np.dtype[Any] | None:
    """KServe datatype to numpy: "FP32" -> float32, "BYTES" -> object, "BF16" -> bfloat16 (None without ml_dtypes)."""
    return datatype_info(datatype).dtype


def datatype_itemsize(datatype: str) -> int:
    """Bytes per element; 0 for BYTES, whose elements vary in length."""
    return datatype_info(datatype).itemsize


def numpy_to_datatype(dtype: np.dtype[Any] | type[Any]) -> str:
    """float32 -> "FP32"; object, bytes and str arrays -> "BYTES". ValueError for others (and byte-swapped)."""
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return "BYTES"
    info = _BY_DTYPE.get(dt)  # a non-native byte order matches nothing: the wire is native
    if info is None:
        raise ValueError(f"numpy dtype {dt.str} has no inference datatype")
    return info.datatype


def ort_type_to_datatype(ort_type: str) -> str:
    """ONNX Runtime's NodeArg.type ("tensor(float)") -> "FP32". ValueError for non-tensor types."""
    try:
        return _ORT_TYPES[ort_type]
    except KeyError:
        raise ValueError(f"ONNX Runtime type {ort_type!r} has no inference datatype") from None
