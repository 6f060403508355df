"""Prometheus metrics of the server, gathered when scraped (`Collector.render`), served on the HTTP port at
`/metrics` by `kernelport.protocol.http_frontend`. Names and meanings: `collector.py`."""

from __future__ import annotations

from kernelport.metrics.collector import Collector
from kernelport.metrics.exposition import CONTENT_TYPE, MetricFamily, render
from kernelport.metrics.gpu import NvmlMetrics

__all__ = ["CONTENT_TYPE", "Collector", "MetricFamily", "NvmlMetrics", "render"]
