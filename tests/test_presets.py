"""Presets (`kernelport serve --preset`, config parameter `kernelport.preset`): the effective batching and
instance policy, as the ModelConfig RPC (tritonclient), HTTP config, the server's status (worker
processes) and the model's description to local clients show it; fields the config states win.

The unit tests apply presets to ModelConfig messages; the served ones start a real server with
`--preset throughput` over add_sub variants."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from conftest import ServerProcess, add_sub_variant
from kernelport import Client
from kernelport.batching.presets import THROUGHPUT_CPU_INSTANCES, THROUGHPUT_WINDOW_US, apply_preset, model_preset
from kernelport.errors import ConfigError
from kernelport.repository.config import parse_config

pytestmark = pytest.mark.timeout(180)

def _config(text: str) -> Any:
    return parse_config(text, model_name="m")


BATCHING = 'name: "m"\nmax_batch_size: 8\n'


# ---- the rules, on messages -------------------------------------------------------------------------


def test_throughput_fills_what_the_config_leaves_unset() -> None:
    out = apply_preset(_config(BATCHING), "throughput")
    assert out.HasField("dynamic_batching")
    assert out.dynamic_batching.max_queue_delay_microseconds == THROUGHPUT_WINDOW_US == 500
    assert [g.count for g in out.instance_group] == [THROUGHPUT_CPU_INSTANCES] == [2]
    assert out.parameters["kernelport.preset"].string_value == "throughput"
    assert out.parameters["kernelport.client_spin_microseconds"].string_value == "0"
    assert apply_preset(out, "throughput") == out  # idempotent


def test_latency_has_no_window_and_one_instance() -> None:
    out = apply_preset(_config(BATCHING), "latency")
    assert out.HasField("dynamic_batching") and out.dynamic_batching.max_queue_delay_microseconds == 0
    assert [g.count for g in out.instance_group] == [1]
    assert float(out.parameters["kernelport.client_spin_microseconds"].string_value) > 0


def test_explicit_fields_win() -> None:
    text = BATCHING + (
        "dynamic_batching { max_queue_delay_microseconds: 120 preferred_batch_size: [ 4 ] }\n"
        "instance_group [ { count: 3 kind: KIND_CPU } ]\n"
        'parameters { key: "kernelport.client_spin_microseconds" value { string_value: "7" } }\n')
    out = apply_preset(_config(text), "throughput")
    assert out.dynamic_batching.max_queue_delay_microseconds == 120
    assert list(out.dynamic_batching.preferred_batch_size) == [4]
    assert [g.count for g in out.instance_group] == [3]
    assert out.parameters["kernelport.client_spin_microseconds"].string_value == "7"
    out = apply_preset(_config(text), "latency")
    assert out.dynamic_batching.max_queue_delay_microseconds == 120 and out.instance_group[0].count == 3


def test_no_batching_and_gpu_groups_are_left_alone() -> None:
    out = apply_preset(_config('name: "m"\nmax_batch_size: 0\n'), "throughput")
    assert not out.HasField("dynamic_batching")
    out = apply_preset(_config(BATCHING + 'sequence_batching { }\n'), "throughput")
    assert not out.HasField("dynamic_batching")
    out = apply_preset(_config(BATCHING + "instance_group [ { kind: KIND_GPU } ]\n"), "throughput")
    assert [g.count for g in out.instance_group] == [1]


def test_model_parameter_wins_over_the_server_preset() -> None:
    def with_param(value: str) -> Any:
        return _config(BATCHING + f'parameters {{ key: "kernelport.preset" value {{ string_value: "{value}" }} }}\n')

    assert model_preset(_config(BATCHING), "throughput") == "throughput"
    assert model_preset(with_param("latency"), "throughput") == "latency"
    assert model_preset(with_param("none"), "throughput") is None
    with pytest.raises(ConfigError, match="kernelport.preset"):
        model_preset(with_param("fastest"), None)


# ---- served ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preset_server(example_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`--preset throughput` over: add_sub (its config states window 0 and no instance group: the preset
    fills both), add_sub_explicit (states a 200 us window and one instance), add_sub_latency (its own
    `kernelport.preset: latency`)."""
    repo = str(tmp_path_factory.mktemp("preset_repo"))
    shutil.copytree(os.path.join(example_repo, "add_sub"), os.path.join(repo, "add_sub"))
    add_sub_variant(repo, "add_sub_explicit", "dynamic_batching { max_queue_delay_microseconds: 200 }\n"
                                              "instance_group [ { count: 1 kind: KIND_CPU } ]\n")
    add_sub_variant(repo, "add_sub_latency", "dynamic_batching { }\n"
                    'parameters { key: "kernelport.preset" value { string_value: "latency" } }\n')
    sock = str(tmp_path_factory.mktemp("preset_sock") / "kp.sock")
    server = ServerProcess.with_ports(repo, sock, "--preset", "throughput", grpc=True, http=True)
    yield server
    assert server.stop() == 0, server.log()


def test_served_policy_follows_the_preset(preset_server: ServerProcess) -> None:
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{preset_server.grpc_port}")
    try:
        configs = {m: c.get_model_config(m).config for m in ("add_sub", "add_sub_explicit", "add_sub_latency")}
    finally:
        c.close()
    window = {m: cfg.dynamic_batching.max_queue_delay_microseconds for m, cfg in configs.items()}
    instances = {m: [g.count for g in cfg.instance_group] for m, cfg in configs.items()}
    presets = {m: cfg.parameters["kernelport.preset"].string_value for m, cfg in configs.items()}
    assert window == {"add_sub": 500, "add_sub_explicit": 200, "add_sub_latency": 0}
    assert instances == {"add_sub": [2], "add_sub_explicit": [1], "add_sub_latency": [1]}
    assert presets == {"add_sub": "throughput", "add_sub_explicit": "throughput", "add_sub_latency": "latency"}

    with Client(preset_server.socket_path) as local:
        status = local.server_status()
        workers = {m: len(status[m]["workers"]) for m in configs}
        assert workers == {"add_sub": 2, "add_sub_explicit": 1, "add_sub_latency": 1}
        assert local.model_metadata("add_sub")["client_spin_us"] == 0
        assert local.model_metadata("add_sub_latency")["client_spin_us"] > 0
        out = local.infer("add_sub", {"INPUT0": _ones(), "INPUT1": _ones()})  # both instances serve
        assert (out["OUTPUT0"] == 2).all()


def test_http_config_shows_the_same_policy(preset_server: ServerProcess) -> None:
    import json
    import urllib.request

    url = f"http://127.0.0.1:{preset_server.http_port}/v2/models/add_sub/config"
    with urllib.request.urlopen(url, timeout=30) as r:
        cfg = json.load(r)
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 500
    assert cfg["instance_group"][0]["count"] == 2


def _ones() -> object:
    import numpy as np

    return np.ones((1, 16), np.float32)
