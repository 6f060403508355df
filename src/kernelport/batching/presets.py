"""Presets: a batching and instance policy chosen by name, for the whole server (`kernelport serve
--preset`) or one model (config parameter `kernelport.preset`, which wins over the server's).

- `latency`: no queue delay (as soon as the worker is free it closes the slot with the rows claimed by
  then, and runs it once they are committed: batch what is waiting), one instance, and a short client
  spin (`LATENCY_CLIENT_SPIN_US`) so a waiting local client is awake when a fast answer comes without
  holding a core for long.
- `throughput`: a batching window (`THROUGHPUT_WINDOW_US`, or the config's own), a slot closing at the
  largest preferred batch size or at max_batch_size, `THROUGHPUT_CPU_INSTANCES` instances unless the model
  is placed on a GPU, and no client spin (a client waits through the window asleep).

Both turn dynamic batching on for a model that batches (max_batch_size >= 1) and has no other scheduler.
What the config states wins over the preset: a non-zero `max_queue_delay_microseconds`, an
`instance_group` count, a `kernelport.client_spin_microseconds` parameter. (proto3 keeps no presence for
numbers: a zero counts as not stated.) The effective values are written into the model's configuration, so
the ModelConfig RPC and `/v2/models/{m}/config` show them, with `kernelport.preset` among its parameters.
"""

from __future__ import annotations

from typing import Any

from kernelport.errors import ConfigError

__all__ = ["PRESETS", "apply_preset", "model_preset"]

PRESETS = ("latency", "throughput")
PRESET_PARAMETER = "kernelport.preset"
CLIENT_SPIN_PARAMETER = "kernelport.client_spin_microseconds"
THROUGHPUT_WINDOW_US = 500
THROUGHPUT_CPU_INSTANCES = 2
LATENCY_CLIENT_SPIN_US = 20
THROUGHPUT_CLIENT_SPIN_US = 0
_KIND_GPU = 1


def model_preset(config: Any, server_preset: str | None) -> str | None:
    """The preset of one model: its `kernelport.preset` parameter, else the server's `--preset`."""
    name = config.name or "?"
    if PRESET_PARAMETER in config.parameters:
        value = config.parameters[PRESET_PARAMETER].string_value.strip().lower()
        if value in ("", "none"):
            return None
        if value not in PRESETS:
            raise ConfigError(f"model '{name}': parameter {PRESET_PARAMETER} must be one of "
                              f"{', '.join(PRESETS)} or none, got {value[:40]!r}")
        return value
    return server_preset


def apply_preset(config: Any, preset: str | None) -> Any:
    """A copy of a ModelConfig message with the preset's values in the fields the config leaves unset.
    Idempotent: the server applies it before the workers start (instances) and again after the config is
    completed from the model (batching)."""
    out = type(config)()
    out.CopyFrom(config)
    if preset is None:
        return out
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (presets: {', '.join(PRESETS)})")
    out.parameters[PRESET_PARAMETER].string_value = preset
    other_scheduler = out.HasField("sequence_batching") or out.HasField("ensemble_scheduling")
    if out.max_batch_size > 0 and not other_scheduler:
        db = out.dynamic_batching  # reading the sub-message is not setting it: SetInParent below
        db.SetInParent()
        if preset == "throughput" and db.max_queue_delay_microseconds == 0:
            db.max_queue_delay_microseconds = THROUGHPUT_WINDOW_US
    instances = 1 if preset == "latency" else THROUGHPUT_CPU_INSTANCES
    if not len(out.instance_group):
        g = out.instance_group.add()
        g.count = instances
    else:
        for g in out.instance_group:
            if g.count == 0:
                # throughput's extra instance is for CPU: a GPU instance keeps one per device
                g.count = 1 if (g.kind == _KIND_GPU or len(g.gpus)) else instances
    if CLIENT_SPIN_PARAMETER not in out.parameters:
        spin = LATENCY_CLIENT_SPIN_US if preset == "latency" else THROUGHPUT_CLIENT_SPIN_US
        out.parameters[CLIENT_SPIN_PARAMETER].string_value = str(spin)
    return out
