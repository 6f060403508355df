"""Who runs first: priority levels and weighted shares between tenants of a model.

A request belongs to a *class*: its priority level (Triton's `dynamic_batching.priority_levels`) and its
tenant (the `kernelport-tenant` header over gRPC/HTTP, `tenant=` locally). Each class gets lanes of its
own, so requests of different classes never share a batch and a flood fills only its own slots. The
worker chooses among the lanes with a batch ready (`_kpcore.Scheduler`): the lowest level number
first (strict), then within a level the tenant that has used the least of its weighted share.

Decisions where Triton is silent or has no tenants:
- priority 0, or a level above `priority_levels`, means the default level (Triton's reading);
- tenant weights come from the config parameter `kernelport.tenant_weights` ("gold:4,silver:2");
  a tenant not listed weighs `kernelport.default_tenant_weight` (1);
- at most `kernelport.max_tenants` (8) named tenants get a class of their own per model; requests
  without a tenant, and tenants beyond that, share the default class;
- the tenant is what the caller says: it is a scheduling label, not an identity check.

Between models that share the CPU, the kernel schedules their worker processes: `kernelport.model_weight`
sets the workers' nice level so that busy models get CPU time by weight, and `kernelport.cpus` confines a
model's workers to some CPUs (both applied by the worker at start).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kernelport.errors import ConfigError, InvalidInputError

TENANT_HEADER = "kernelport-tenant"
MAX_WEIGHT = 1_000_000
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")


def check_tenant(tenant: Any, model: str) -> str:
    """A tenant label from a request: '' (none) or 1-64 characters of letters, digits and ._:@-."""
    if tenant is None or tenant == "":
        return ""
    if not isinstance(tenant, str) or not _TENANT_RE.match(tenant):
        raise InvalidInputError(
            f"model '{model}': tenant {str(tenant)[:80]!r} is not valid (1-64 characters: letters, digits, ._:@-)")
    return tenant


def parse_priority(value: Any, model: str) -> int:
    """A request's priority parameter: a non-negative integer (0 = the model's default level)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 64:
        raise InvalidInputError(f"model '{model}': priority must be a non-negative integer, got {value!r}")
    return value


def _weight(text: str, key: str) -> int:
    try:
        w = int(text)
    except ValueError:
        raise ConfigError(f"parameter {key}: weight {text!r} is not an integer") from None
    if not 1 <= w <= MAX_WEIGHT:
        raise ConfigError(f"parameter {key}: weight {w} is not in 1..{MAX_WEIGHT}")
    return w


@dataclass(frozen=True)
class SchedulingPolicy:
    priority_levels: int = 0  # 0: no levels (every request at level 0)
    default_priority: int = 0
    tenant_weights: Mapping[str, int] = field(default_factory=dict)
    default_weight: int = 1
    max_tenants: int = 8

    @classmethod
    def from_config(cls, config: Any, parameters: Mapping[str, str], model: str) -> SchedulingPolicy:
        levels = default = 0
        if config.HasField("dynamic_batching"):
            db = config.dynamic_batching
            levels = int(db.priority_levels)
            default = int(db.default_priority_level)
            if levels > 64:
                raise ConfigError(f"model '{model}': dynamic_batching.priority_levels {levels} is over 64")
            if levels and not 1 <= default <= levels:
                raise ConfigError(f"model '{model}': dynamic_batching.default_priority_level must be in "
                                  f"1..{levels} when priority_levels is {levels}, got {default}")
            for level in db.priority_queue_policy:
                if not 1 <= int(level) <= levels:
                    raise ConfigError(f"model '{model}': dynamic_batching.priority_queue_policy has level "
                                      f"{level}, outside 1..{levels}")
        weights: dict[str, int] = {}
        key = "kernelport.tenant_weights"
        for item in filter(None, (s.strip() for s in parameters.get(key, "").split(","))):
            name, sep, w = item.rpartition(":")
            if not sep or not name:
                raise ConfigError(f"parameter {key}: expected 'tenant:weight', got {item!r}")
            weights[check_tenant(name, model)] = _weight(w, key)
        default_weight = _weight(parameters.get("kernelport.default_tenant_weight", "1"),
                                 "kernelport.default_tenant_weight")
        try:
            max_tenants = int(parameters.get("kernelport.max_tenants", "8"))
        except ValueError:
            raise ConfigError("parameter kernelport.max_tenants: not an integer") from None
        if not 0 <= max_tenants <= 32:
            raise ConfigError("parameter kernelport.max_tenants: must be in 0..32")
        return cls(levels, default, weights, default_weight, max(max_tenants, len(weights)))

    def weight(self, tenant: str) -> int:
        return self.tenant_weights.get(tenant, self.default_weight)


class TenantClasses:
    """Share classes of one model: 0 for requests without a tenant (and tenants over the limit), then
    one per named tenant in order of first appearance (configured tenants first)."""

    def __init__(self, policy: SchedulingPolicy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._index: dict[str, int] = {}
        for name in policy.tenant_weights:
            self._index[name] = len(self._index) + 1

    def resolve(self, tenant: str) -> tuple[int, str]:
        """(class index, the tenant the class stands for: '' for the shared default class)."""
        if not tenant:
            return 0, ""
        with self._lock:
            idx = self._index.get(tenant)
            if idx is None:
                if len(self._index) >= self.policy.max_tenants:
                    return 0, ""
                idx = self._index[tenant] = len(self._index) + 1
            return idx, tenant


# Linux CFS's weight of each nice level 0..19 (kernel/sched/core.c's table): a runnable process gets CPU
# time in proportion to its weight, so a model's weight maps to the nice level whose weight is closest.
_CFS_WEIGHTS = (1024, 820, 655, 526, 423, 335, 272, 215, 172, 137, 110, 87, 70, 56, 45, 36, 29, 23, 18, 15)


def model_nice(parameters: Mapping[str, str], model: str) -> int:
    """The nice level for a model's workers from `kernelport.model_weight` (15..1024, default 1024: nice 0).
    Models on the CPU share it by the kernel's weights: a model of weight 256 gets a quarter of the CPU
    time of a default one while both are busy (only lowering is possible without privileges)."""
    key = "kernelport.model_weight"
    if key not in parameters:
        return 0
    try:
        w = float(parameters[key])
    except ValueError:
        raise ConfigError(f"model '{model}': parameter {key}: not a number: {parameters[key]!r}") from None
    if not 15 <= w <= 1024:
        raise ConfigError(f"model '{model}': parameter {key}: must be in 15..1024 (CPU weight; 1024 = nice 0)")
    return min(range(len(_CFS_WEIGHTS)), key=lambda n: abs(_CFS_WEIGHTS[n] - w))


def model_cpus(parameters: Mapping[str, str], model: str) -> set[int] | None:
    """`kernelport.cpus`: the CPUs the model's workers may run on ("0-3,6"), None when not set."""
    text = parameters.get("kernelport.cpus", "").strip()
    if not text:
        return None
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            a, b = int(lo), int(hi or lo)
            if a < 0 or b < a or b > 4095:
                raise ValueError
            cpus.update(range(a, b + 1))
    except ValueError:
        raise ConfigError(f"model '{model}': parameter kernelport.cpus: expected a list like '0-3,6', "
                          f"got {text!r}") from None
    return cpus


def sched_key(level: int, share_class: int) -> str:
    """The class part of a lane's key ('' for the plain class, so single-class models keep theirs)."""
    return f"p{level}t{share_class}/" if level or share_class else ""


__all__ = ["TENANT_HEADER", "SchedulingPolicy", "TenantClasses", "check_tenant", "model_cpus", "model_nice",
           "parse_priority", "sched_key"]
