"""BYTES tensors in lane rows.

A BYTES element has no fixed size, so a lane that carries a BYTES tensor gives each element a fixed
capacity K (a power of two, part of the lane's key): the element's row area is a little-endian u32
length followed by K bytes. Inputs of different lengths thus land in lanes of different capacities,
like any other shape difference.
"""

from __future__ import annotations

import numpy as np

from kernelport.errors import InvalidInputError

MIN_CAPACITY = 16
MAX_CAPACITY = 1 << 24


def capacity_for(length: int) -> int:
    """The lane element capacity that holds elements of up to `length` bytes."""
    cap = MIN_CAPACITY
    while cap < length:
        cap <<= 1
    return cap


def as_bytes_elements(a: np.ndarray) -> np.ndarray:
    """An object array of `bytes` (str elements encoded as UTF-8), the form BYTES tensors take here."""
    flat = a.reshape(-1)
    out = np.empty(flat.shape, dtype=object)
    for i, v in enumerate(flat):
        if isinstance(v, bytes):
            out[i] = v
        elif isinstance(v, str):
            out[i] = v.encode("utf-8")
        elif isinstance(v, (bytearray, memoryview, np.bytes_)):
            out[i] = bytes(v)
        else:
            raise InvalidInputError(f"BYTES element of type {type(v).__name__}: expected bytes or str")
    return out.reshape(a.shape)


def all_utf8(a: np.ndarray) -> bool:
    try:
        for v in a.reshape(-1):
            v.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def max_element_length(a: np.ndarray) -> int:
    return max((len(v) for v in a.reshape(-1)), default=0)


def encode_into(rows: np.ndarray, a: np.ndarray) -> None:
    """Write the elements of `a` (object array of bytes) into `rows` (uint8 [..., 4 + K])."""
    cap = rows.shape[-1] - 4
    flat_rows = rows.reshape(-1, cap + 4)
    flat = a.reshape(-1)
    if flat.shape[0] != flat_rows.shape[0]:
        raise InvalidInputError(f"BYTES tensor of {flat.shape[0]} elements does not fit {flat_rows.shape[0]} rows")
    lengths = flat_rows[:, :4].view("<u4")
    for i, v in enumerate(flat):
        n = len(v)
        if n > cap:
            raise InvalidInputError(f"BYTES element of {n} bytes exceeds the lane capacity {cap}")
        lengths[i, 0] = n
        flat_rows[i, 4:4 + n] = np.frombuffer(v, dtype=np.uint8)


def decode(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Read an object array of bytes of `shape` from `rows` (uint8 [..., 4 + K]); lengths are checked."""
    cap = rows.shape[-1] - 4
    flat_rows = rows.reshape(-1, cap + 4)
    lengths = flat_rows[:, :4].view("<u4")[:, 0]
    out = np.empty(flat_rows.shape[0], dtype=object)
    for i in range(flat_rows.shape[0]):
        n = int(lengths[i])
        if n > cap:
            raise ValueError(f"BYTES element length {n} exceeds the lane capacity {cap}")
        out[i] = flat_rows[i, 4:4 + n].tobytes()
    return out.reshape(shape)
