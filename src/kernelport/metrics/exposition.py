"""Prometheus text exposition format (version 0.0.4): metric families, samples, escaping.

A family has one name, one type and one help text; `render` writes its `# HELP` and `# TYPE` lines once,
then its samples. Label values are escaped (backslash, double quote, newline), help text too (backslash,
newline). A histogram's samples are `<name>_bucket{le=...}` (cumulative counts, ending with `le="+Inf"`),
`<name>_sum` and `<name>_count`, all under the family's single HELP/TYPE.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["CONTENT_TYPE", "MetricFamily", "escape_help", "escape_label_value", "format_value", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TYPES = ("counter", "gauge", "histogram", "untyped")
_CHECKED_LABELS: set[str] = set()  # label names already found valid (a handful: model, version, le, ...)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


class MetricFamily:
    """One metric name with its type, help text and samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        if not _NAME.match(name):
            raise ValueError(f"not a Prometheus metric name: {name!r}")
        if kind not in _TYPES:
            raise ValueError(f"not a Prometheus metric type: {kind!r}")
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: list[tuple[str, tuple[tuple[str, str], ...], float]] = []

    def add(self, value: float, labels: Mapping[str, str] | None = None, suffix: str = "") -> None:
        items = tuple((k, str(v)) for k, v in (labels or {}).items())
        for k, _ in items:
            if k not in _CHECKED_LABELS:
                if not _LABEL.match(k) or k.startswith("__"):
                    raise ValueError(f"metric {self.name}: not a label name: {k!r}")
                _CHECKED_LABELS.add(k)
        self.samples.append((self.name + suffix, items, value))

    def add_histogram(self, labels: Mapping[str, str], buckets: Sequence[tuple[float, int]], total: float,
                      count: int) -> None:
        """`buckets`: (upper bound, cumulative count) in increasing order of bound, without +Inf (added
        here with `count`)."""
        if self.kind != "histogram":
            raise ValueError(f"metric {self.name} is a {self.kind}, not a histogram")
        for bound, cumulative in buckets:
            self.add(cumulative, {**labels, "le": format_value(float(bound))}, "_bucket")
        self.add(count, {**labels, "le": "+Inf"}, "_bucket")
        self.add(total, labels, "_sum")
        self.add(count, labels, "_count")


def _sample_line(name: str, labels: tuple[tuple[str, str], ...], value: float) -> str:
    if labels:
        inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)
        return f"{name}{{{inner}}} {format_value(value)}\n"
    return f"{name} {format_value(value)}\n"


def render(families: Iterable[MetricFamily]) -> str:
    out: list[str] = []
    seen: set[str] = set()
    for f in families:
        if f.name in seen:
            raise ValueError(f"metric family {f.name} given twice")
        seen.add(f.name)
        out.append(f"# HELP {f.name} {escape_help(f.help)}\n")
        out.append(f"# TYPE {f.name} {f.kind}\n")
        out.extend(_sample_line(*s) for s in f.samples)
    return "".join(out)
