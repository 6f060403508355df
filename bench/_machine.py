"""What the machine's CPUs did, for the bench scripts: this benchmark's process trees against the rest.

These machines are shared and have few cores, so every figure is recorded with the CPU other processes
used meanwhile (`ForeignLoad`) and the cores each side of the benchmark used (`CpuUse`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def proc_table() -> tuple[dict[int, int], dict[int, int]]:
    """(parent pid, utime + stime jiffies) of every live process."""
    parent: dict[int, int] = {}
    used: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid = int(entry)
        parent[pid] = int(fields[1])
        used[pid] = int(fields[11]) + int(fields[12])
    return parent, used


def subtree_cpu(roots: Sequence[int], parent: Mapping[int, int], used: Mapping[int, int]) -> int:
    tree = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(used.get(pid, 0) for pid in tree)


def our_cpu() -> int:
    """Jiffies used by this process, the children it reaped, and every live descendant (the server, its
    workers, the client processes)."""
    parent, used = proc_table()
    t = os.times()
    reaped = round((t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))
    return subtree_cpu([os.getpid()], parent, used) + reaped


class CpuUse:
    """CPU cores used over an interval by named process trees (the server with its workers; the clients)."""

    def __init__(self, trees: Mapping[str, Sequence[int]]) -> None:
        self.trees = {name: list(roots) for name, roots in trees.items() if roots}
        self._t0 = time.monotonic()
        self._start = self._sample()

    def _sample(self) -> dict[str, int]:
        parent, used = proc_table()
        return {name: subtree_cpu(roots, parent, used) for name, roots in self.trees.items()}

    def cores(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        end = self._sample()
        hz = os.sysconf("SC_CLK_TCK")
        return {name: (end[name] - self._start[name]) / hz / wall for name in self.trees} if wall > 0 else {}


class ForeignLoad:
    """The share of the machine's CPU time that processes outside this benchmark used over an interval.
    These machines are shared: another tenant's busy core moves the spinning paths most, so each row
    records it."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[int, int, int] | None:
        try:
            busy, total = cpu_times()
            return busy, total, our_cpu()
        except (OSError, ValueError, IndexError):
            return None

    def fraction(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return None
        busy, total, ours = (e - s for e, s in zip(end, self._start))
        return min(1.0, max(0.0, (busy - ours) / total))


__all__ = ["CpuUse", "ForeignLoad", "cpu_times", "our_cpu", "proc_table", "subtree_cpu"]
