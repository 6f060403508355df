"""Placement of a model's instances on GPUs and MIG slices (kernelport.gpu.placement), from inventories given as
data: every rule of instance_group, CUDA_VISIBLE_DEVICES filtering, memory budgets and their errors. Plus a real
server that refuses a KIND_GPU model on this machine when it has no GPU."""

from __future__ import annotations

import os
import shutil

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess
from kernelport.errors import ConfigError
from kernelport.gpu import cuda
from kernelport.gpu.placement import (
    DeviceMemoryError,
    DeviceMemoryLedger,
    PlacementError,
    estimate_instance_memory,
    groups_from_config,
    parse_byte_size,
    place_instances,
    visible_slots,
)
from kernelport.repository import parse_config

GiB = 1 << 30
U0 = "GPU-00000000-1111-2222-3333-444444444444"
U1 = "GPU-aaaaaaaa-1111-2222-3333-444444444444"
U2 = "GPU-bbbbbbbb-1111-2222-3333-444444444444"
M0 = "MIG-0c0c0c0c-1111-2222-3333-444444444444"
M1 = "MIG-1d1d1d1d-1111-2222-3333-444444444444"


def gpu(i: int, uuid: str, free: int = 70 * GiB, total: int = 80 * GiB, mig: list | None = None) -> dict:
    return {"index": i, "uuid": uuid, "name": "test gpu", "total_memory": total, "free_memory": free,
            "mig": mig or []}


TWO = [gpu(0, U0), gpu(1, U1)]
MIGGED = [gpu(0, U0), gpu(1, U1, mig=[{"uuid": M0, "total_memory": 10 * GiB, "free_memory": 9 * GiB},
                                       {"uuid": M1, "total_memory": 20 * GiB, "free_memory": 19 * GiB}]),
          gpu(2, U2)]


def groups(text: str) -> list:
    return groups_from_config(parse_config("name: \"m\"\nplatform: \"onnxruntime_onnx\"\n" + text, model_name="m"))


def where(ps: list) -> list[tuple[str, str | None]]:
    return [(p.kind, p.device.uuid if p.device else None) for p in ps]


def test_kind_gpu_places_count_per_listed_gpu_with_uuid_env() -> None:
    ps = place_instances("m", groups("instance_group [ { kind: KIND_GPU count: 2 gpus: [ 1, 0 ] } ]"), TWO)
    assert where(ps) == [("gpu", U1), ("gpu", U1), ("gpu", U0), ("gpu", U0)]
    assert [p.instance for p in ps] == [0, 1, 2, 3]
    env = ps[0].env()
    assert env["CUDA_VISIBLE_DEVICES"] == U1 and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert ps[0].ordinal == 0 and ps[0].device_name == "cuda:0"


def test_kind_gpu_without_gpus_uses_every_visible_gpu() -> None:
    ps = place_instances("m", groups("instance_group [ { kind: KIND_GPU } ]"), TWO)
    assert where(ps) == [("gpu", U0), ("gpu", U1)]


def test_no_instance_group_is_auto_gpu_or_cpu() -> None:
    assert where(place_instances("m", [], TWO)) == [("gpu", U0), ("gpu", U1)]
    assert where(place_instances("m", [], [])) == [("cpu", None)]
    assert place_instances("m", [], [])[0].env() == {}


def test_kind_auto_with_gpus_on_a_machine_without_gpu_runs_count_on_cpu() -> None:
    g = groups("instance_group [ { kind: KIND_AUTO count: 3 gpus: [ 0, 1 ] } ]")
    assert where(place_instances("m", g, [])) == [("cpu", None)] * 3
    assert where(place_instances("m", g, TWO)) == [("gpu", U0)] * 3 + [("gpu", U1)] * 3


def test_mixed_groups_and_kind_model() -> None:
    g = groups("instance_group [ { kind: KIND_GPU gpus: [ 1 ] }, { kind: KIND_CPU count: 2 }, "
               "{ kind: KIND_MODEL } ]")
    assert where(place_instances("m", g, TWO)) == [("gpu", U1), ("cpu", None), ("cpu", None), ("model", None)]


def test_errors_name_model_group_and_devices() -> None:
    with pytest.raises(PlacementError, match=r"model 'm' instance_group 'big'.*device 2.*0\.\.1 \(GPU-0000"):
        place_instances("m", groups('instance_group [ { name: "big" kind: KIND_GPU gpus: [ 2 ] } ]'), TWO)
    with pytest.raises(PlacementError, match=r"KIND_GPU asked, but no GPU is visible to the server \(no driver\)"):
        place_instances("m", groups("instance_group [ { kind: KIND_GPU } ]"), [], no_gpu_reason="no driver")
    with pytest.raises(PlacementError, match=r"KIND_CPU does not take gpus \(got \[0\]\)"):
        place_instances("m", groups("instance_group [ { kind: KIND_CPU gpus: [ 0 ] } ]"), TWO)
    assert issubclass(PlacementError, ConfigError)  # INVALID_ARGUMENT, a config that cannot load here


def test_mig_slices_are_devices_and_hide_their_gpu() -> None:
    slots = visible_slots(MIGGED)
    assert [(s.index, s.uuid, s.gpu_index, s.mig) for s in slots] == [
        (0, U0, 0, False), (1, M0, 1, True), (2, M1, 1, True), (3, U2, 2, False)]
    ps = place_instances("m", groups("instance_group [ { kind: KIND_GPU gpus: [ 2 ] } ]"), MIGGED)
    assert ps[0].env()["CUDA_VISIBLE_DEVICES"] == M1  # a MIG slice is named by its UUID
    assert ps[0].device is not None and ps[0].device.total_memory == 20 * GiB


def test_server_cuda_visible_devices_filters_and_reorders() -> None:
    assert [s.uuid for s in visible_slots(MIGGED, "2,0")] == [U2, U0]
    assert [s.index for s in visible_slots(MIGGED, "2,0")] == [0, 1]
    assert [s.uuid for s in visible_slots(MIGGED, M1)] == [M1]
    assert [s.uuid for s in visible_slots(MIGGED, "1")] == [M0, M1]  # a MIG-mode GPU by index: its slices
    assert [s.uuid for s in visible_slots(MIGGED, "GPU-bbbb")] == [U2]  # a unique prefix, as CUDA accepts
    assert [s.uuid for s in visible_slots(MIGGED, "0,7,2")] == [U0]  # CUDA stops at the first invalid entry
    assert visible_slots(MIGGED, "") == [] and visible_slots(MIGGED, "-1") == []
    with pytest.raises(PlacementError, match="CUDA_VISIBLE_DEVICES hides them"):
        place_instances("m", groups("instance_group [ { kind: KIND_GPU } ]"), MIGGED, visible="")
    # gpus indexes the visible devices, as CUDA ordinals in the server would
    ps = place_instances("m", groups("instance_group [ { kind: KIND_GPU gpus: [ 1 ] } ]"), MIGGED, visible="2,0")
    assert where(ps) == [("gpu", U0)]


def test_memory_budget_error_names_model_device_needed_and_available() -> None:
    inv = [gpu(0, U0, free=3 * GiB, total=80 * GiB)]
    g = groups("instance_group [ { kind: KIND_GPU count: 2 } ]")
    assert len(place_instances("bert", g, inv, memory_per_instance=GiB + GiB // 2)) == 2  # 3 GiB fits exactly
    with pytest.raises(DeviceMemoryError) as e:
        place_instances("bert", g, inv, memory_per_instance=2 * GiB)
    msg = str(e.value)
    assert "model 'bert' does not fit on GPU 0 (GPU-0000" in msg
    assert "2 instance(s) need 4.0 GiB, 3.0 GiB is available (3.0 GiB free of 80.0 GiB)" in msg
    assert DeviceMemoryError.grpc_code == "RESOURCE_EXHAUSTED"
    with pytest.raises(DeviceMemoryError, match="MIG slice"):
        place_instances("m", groups("instance_group [ { kind: KIND_GPU gpus: [ 1 ] } ]"), MIGGED,
                        memory_per_instance=10 * GiB)


def test_ledger_counts_loads_in_progress_and_releases_them() -> None:
    ledger = DeviceMemoryLedger()
    inv = [gpu(0, U0, free=10 * GiB)]
    g = groups("instance_group [ { kind: KIND_GPU } ]")
    t1, _ = ledger.place("a", g, inv, memory_per_instance=6 * GiB)
    assert ledger.reserved() == {U0: 6 * GiB}
    with pytest.raises(DeviceMemoryError, match=r"4.0 GiB is available .*6.0 GiB of it promised to models still"):
        ledger.place("b", g, inv, memory_per_instance=6 * GiB)
    ledger.release(t1)
    assert ledger.reserved() == {}
    t2, ps = ledger.place("b", g, inv, memory_per_instance=6 * GiB)
    assert len(ps) == 1 and ledger.reserved() == {U0: 6 * GiB}
    ledger.release(t2)


def test_memory_estimate_and_byte_sizes() -> None:
    assert parse_byte_size("512MiB", "x") == 512 << 20
    assert parse_byte_size(" 2 GiB", "x") == 2 << 30
    assert parse_byte_size("1000", "x") == 1000
    assert parse_byte_size("1.5gb", "x") == 1_500_000_000
    for bad in ("", "lots", "-1", "3 parsecs"):
        with pytest.raises(ConfigError, match="expected a byte size"):
            parse_byte_size(bad, "model 'm' parameter 'p'")
    assert estimate_instance_memory("m", {"kernelport.gpu_memory_bytes": "3GiB"}, 10**9) == 3 << 30
    assert estimate_instance_memory("m", {}, 1000) == (512 << 20) + 2000
    assert estimate_instance_memory("m", {"kernelport.gpu_context_bytes": "1MiB"}, 10) == (1 << 20) + 20


def test_cuda_absent_reasons(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "dev"
    empty.mkdir()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert "device nodes are absent" in str(cuda.cuda_unavailable_reason(dev=str(empty)))
    (empty / "nvidia0").touch()
    assert "no CUDA binding installed (needs one of: no_such_binding)" == cuda.cuda_unavailable_reason(
        dev=str(empty), bindings=("no_such_binding",))
    assert cuda.cuda_unavailable_reason(dev=str(empty), bindings=("numpy",)) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "hides every GPU" in str(cuda.cuda_unavailable_reason(dev=str(empty)))
    with pytest.raises(cuda.CudaUnavailableError, match="^device lanes is not available: CUDA_VISIBLE"):
        cuda.require_cuda("device lanes")


@pytest.mark.skipif(cuda.cuda_available(), reason="this machine has a GPU: the refusal needs one without")
@pytest.mark.timeout(240)
def test_server_refuses_kind_gpu_without_gpu_and_serves_kind_auto(example_repo: str, tmp_path) -> None:
    repo = tmp_path / "repo"
    for name, group in (("on_gpu", "instance_group [ { kind: KIND_GPU count: 1 } ]"),
                        ("on_auto", "instance_group [ { kind: KIND_AUTO count: 2 gpus: [ 0 ] } ]")):
        shutil.copytree(os.path.join(example_repo, "add_sub"), repo / name)
        cfg = repo / name / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace('name: "add_sub"', f'name: "{name}"') + "\n" + group + "\n")
    srv = ServerProcess.with_ports(str(repo), str(tmp_path / "kp.sock"), grpc=True)
    try:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        assert c.is_model_ready("on_auto")
        assert not c.is_model_ready("on_gpu")
        index = {m.name: m for m in c.get_model_repository_index().models}
        assert index["on_gpu"].state == "UNAVAILABLE"
        assert "instance_group 'instance_group[0]': KIND_GPU asked, but no GPU is visible" in index["on_gpu"].reason
        with pytest.raises(InferenceServerException):
            c.get_model_config("on_gpu")
    finally:
        assert srv.stop() == 0, srv.log()


def test_a_placed_worker_addresses_its_only_device_as_ordinal_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernelport.backends.base import instance_gpu
    from kernelport.repository import ModelSpec

    spec = ModelSpec.from_proto(parse_config(
        'name: "m"\nplatform: "onnxruntime_onnx"\ninstance_group [ { kind: KIND_GPU gpus: [ 3 ] } ]', model_name="m"))
    monkeypatch.delenv("KERNELPORT_DEVICE_UUID", raising=False)
    assert instance_gpu(spec) == 3  # a backend loaded on its own: the config's GPU
    placed = place_instances("m", spec.instance_groups, [gpu(i, f"GPU-{i}0000000-1111-2222-3333-444444444444")
                                                         for i in range(4)])
    for key, value in placed[0].env().items():
        monkeypatch.setenv(key, value)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-30000000-1111-2222-3333-444444444444"
    assert instance_gpu(spec) == 0  # in the placed worker, GPU 3 is the only device: CUDA ordinal 0


def test_a_gpu_in_mig_mode_without_slices_offers_no_device() -> None:
    inv = [dict(gpu(0, U0), mig_enabled=True), gpu(1, U1)]
    assert [s.uuid for s in visible_slots(inv)] == [U1]
    assert where(place_instances("m", [], inv)) == [("gpu", U1)]
