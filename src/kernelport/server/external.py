"""Requests whose tensors stay in a client's registered shared memory: the worker binds them there.

A gRPC or HTTP request may name a registered system shared-memory region for an input or an output. The
plain way copies the region into the lane's rows and the output rows back into the region (two copies
on the server, on top of the client's own write). For such a request the server instead maps the region
in the model's workers (once per region: the descriptor goes over the worker's control pipe), claims a
whole slot of the lane for it (so no other request shares its batch), and writes in an
**external table** where each of its tensors lives: in a region (which one, at which offset, how many
bytes) or in the slot's rows as usual. The worker, after taking the slot, finds the entry and binds the
framework to the region's memory directly: ONNX Runtime then reads the inputs and writes the outputs in
the client's region, and nothing is copied on the server side.

The table lives in a segment shared only by the server and the model's workers (never handed to a
client), so a client cannot forge an entry that points the worker at another client's region: an entry
is keyed by the lane's id and the slot's sequence number, which a client cannot choose. The server fills
the entry before it commits the request (the commit's release orders it before the worker's take).

The client may truncate its object at any time: the worker maps regions as `_kpcore.FencedMapping`, checks
`intact()` before a run and `faulted` after it, and fails that request (a SIGBUS inside the mapping is
absorbed by kp_guard.h, never fatal).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import _kpcore

ENTRIES = 64  # requests in flight with external tensors, per model (more fall back to the copying path)
MAX_TENSORS = 16  # tensors per request (inputs and outputs) an entry describes
_HEADER_WORDS = 8  # word 0: entries in use (a hint: the worker looks only when it is not 0)
_ENTRY_WORDS = 4 + 3 * MAX_TENSORS  # lane id, seq, samples, tensors, then (region, offset, bytes) each
TABLE_BYTES = 8 * (_HEADER_WORDS + ENTRIES * _ENTRY_WORDS)

Place = tuple[int, int, int]  # (region id, offset in the region's mapping, bytes); region id 0: the rows


@dataclass
class ExternalPlace:
    """Where a request's tensor is in a client's registered region (a front end's view of it). The data
    plane sets `written` when a worker wrote an output there itself."""

    region: Any  # kernelport.server.shm_registry.SharedMemoryRegion
    offset: int  # within the registered region
    byte_size: int
    written: bool = False


class ExternalTable:
    """The per-model table of requests with tensors in client regions (see the module's docstring)."""

    def __init__(self, segment: Any) -> None:
        self.segment = segment
        words = np.frombuffer(segment, dtype=np.uint64, count=TABLE_BYTES // 8)
        self._hdr = words[:_HEADER_WORDS]
        self._entries = words[_HEADER_WORDS:].reshape(ENTRIES, _ENTRY_WORDS)
        self._free = list(range(ENTRIES - 1, -1, -1))
        self._lock = threading.Lock()

    @classmethod
    def create(cls, model: str) -> ExternalTable:
        return cls(_kpcore.Segment.create(TABLE_BYTES, f"kp-{model}-external"))

    # ---- server side ----

    def reserve(self) -> int | None:
        """An entry for one request, or None when all are in use."""
        with self._lock:
            if not self._free:
                return None
            index = self._free.pop()
            self._hdr[0] += 1
            return index

    def fill(self, index: int, lane_id: int, seq: int, samples: int, places: Sequence[Place]) -> None:
        """Describe the request claimed at (`lane_id`, `seq`); before its commit."""
        if len(places) > MAX_TENSORS:
            raise ValueError(f"an external entry describes at most {MAX_TENSORS} tensors")
        e = self._entries[index]
        e[:] = 0
        for i, (region, offset, nbytes) in enumerate(places):
            e[4 + 3 * i: 7 + 3 * i] = (region, offset, nbytes)
        e[2], e[3] = samples, len(places)
        e[1] = seq
        e[0] = lane_id  # last: an entry with a lane id is complete (the commit publishes it)

    def free(self, index: int) -> None:
        """The request is over (answered, failed or given up)."""
        self._entries[index, 0] = 0
        with self._lock:
            self._free.append(index)
            self._hdr[0] -= 1

    # ---- worker side ----

    def busy(self) -> bool:
        return bool(self._hdr[0])

    def find(self, lane_id: int, seq: int) -> tuple[int, tuple[Place, ...]] | None:
        """The samples and tensor places of the request in slot `seq` of lane `lane_id`, if it has an
        entry."""
        hits = np.flatnonzero((self._entries[:, 0] == lane_id) & (self._entries[:, 1] == seq))
        if not len(hits):
            return None
        e = self._entries[int(hits[0])].tolist()
        places = tuple((e[4 + 3 * i], e[5 + 3 * i], e[6 + 3 * i]) for i in range(e[3]))
        return int(e[2]), places


__all__ = ["ENTRIES", "MAX_TENSORS", "TABLE_BYTES", "ExternalPlace", "ExternalTable", "Place"]
