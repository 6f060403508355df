"""GPU metrics through NVML, with Triton's names, when `pynvml` is importable and sees a device.

NVML is the driver's management library, not CUDA: the server process reads it without creating a CUDA
context (the server never initialises CUDA). Without pynvml, or without a device, `NvmlMetrics.create()`
returns None and the server has no GPU metrics. A device query that fails leaves out that one sample.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kernelport.metrics.exposition import MetricFamily

__all__ = ["NvmlMetrics"]

log = logging.getLogger(__name__)


class NvmlMetrics:
    """The devices NVML sees at start, read on each scrape."""

    def __init__(self, nvml: Any, handles: list[tuple[str, Any]]) -> None:
        self.nvml = nvml
        self.handles = handles  # (uuid, handle)

    @classmethod
    def create(cls) -> NvmlMetrics | None:
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
        except Exception as e:  # no driver: NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            log.info("no GPU metrics: NVML did not start (%s)", e)
            return None
        try:
            handles = []
            for i in range(int(pynvml.nvmlDeviceGetCount())):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(h)
                handles.append((uuid.decode() if isinstance(uuid, bytes) else str(uuid), h))
        except Exception as e:
            log.info("no GPU metrics: NVML could not list the devices (%s)", e)
            handles = []
        if not handles:
            pynvml.nvmlShutdown()
            return None
        log.info("GPU metrics for %d device(s) through NVML", len(handles))
        return cls(pynvml, handles)

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass

    def collect(self) -> list[MetricFamily]:
        n = self.nvml
        util = MetricFamily("nv_gpu_utilization", "gauge", "GPU utilization rate [0.0 - 1.0)")
        total = MetricFamily("nv_gpu_memory_total_bytes", "gauge", "GPU total memory, in bytes")
        used = MetricFamily("nv_gpu_memory_used_bytes", "gauge", "GPU used memory, in bytes")
        power = MetricFamily("nv_gpu_power_usage", "gauge", "GPU power usage in watts")
        limit = MetricFamily("nv_gpu_power_limit", "gauge", "GPU power management limit in watts")
        energy = MetricFamily("nv_energy_consumption", "counter",
                              "GPU energy consumption in joules since the driver was loaded")
        for uuid, h in self.handles:
            labels = {"gpu_uuid": uuid}
            _sample(util, labels, lambda d: n.nvmlDeviceGetUtilizationRates(d).gpu / 100.0, h)
            try:
                mem = n.nvmlDeviceGetMemoryInfo(h)
                total.add(int(mem.total), labels)
                used.add(int(mem.used), labels)
            except Exception as e:
                log.debug("GPU memory of %s: %s", uuid, e)
            _sample(power, labels, lambda d: n.nvmlDeviceGetPowerUsage(d) / 1000.0, h)  # mW
            _sample(limit, labels, lambda d: n.nvmlDeviceGetEnforcedPowerLimit(d) / 1000.0, h)  # mW
            _sample(energy, labels, lambda d: n.nvmlDeviceGetTotalEnergyConsumption(d) / 1000.0, h)  # mJ
        return [util, total, used, power, limit, energy]


def _sample(family: MetricFamily, labels: dict[str, str], read: Callable[[Any], float], handle: Any) -> None:
    try:
        family.add(float(read(handle)), labels)
    except Exception as e:  # NVMLError_NotSupported on some devices: leave the sample out
        log.debug("%s for %s: %s", family.name, labels, e)
