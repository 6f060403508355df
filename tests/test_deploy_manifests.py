"""The manifests under deploy/ state facts about the server: check them against the server itself.

They are not applied to a cluster (none is available); this checks that they parse, that the probes hit the
HTTP port and the health paths the HTTP front end serves, that the container args use only flags
`kernelport serve --help` lists, and that /dev/shm is memory-backed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")

from kernelport.protocol import http_frontend  # noqa: E402

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet"):
        return [doc["spec"]["template"]["spec"]]
    if kind == "ServingRuntime":
        return [doc["spec"]]
    return []


def _kernelport_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    out = []
    for path in MANIFESTS:
        for doc in _documents(path):
            for pod in _pod_specs(doc):
                for c in pod.get("containers", []):
                    if "kernelport" in c.get("command", []) or "kernelport" in str(c.get("image", "")):
                        out.append((f"{path.name}:{c['name']}", pod, c))
    return out


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


@pytest.fixture(scope="module")
def serve_flags() -> set[str]:
    help_text = subprocess.run(
        [sys.executable, "-m", "kernelport.cli.main", "serve", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text))
    assert "--model-repository" in flags and "--http-port" in flags  # the help really was parsed
    return flags


def test_manifests_exist_and_parse() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in MANIFESTS}
    assert {"kubernetes/sidecar.yaml", "kserve/servingruntime.yaml"} <= names
    kinds = {d["kind"] for p in MANIFESTS for d in _documents(p)}
    assert {"Deployment", "ServingRuntime", "InferenceService"} <= kinds
    assert len(_kernelport_containers()) == 2


def test_args_are_serve_flags(serve_flags: set[str]) -> None:
    for where, _, c in _kernelport_containers():
        args = [str(a) for a in c["args"]]
        assert args[0] == "serve", where
        used = {a for a in args if a.startswith("--")}
        unknown = used - serve_flags
        assert not unknown, f"{where}: flags not in `kernelport serve --help`: {sorted(unknown)}"
        assert _arg(args, "--model-repository"), where
        for flag in ("--grpc-port", "--http-port"):
            value = _arg(args, flag)
            assert value is None or value.isdigit(), f"{where}: {flag} {value!r}"


def test_probes_hit_the_http_port_and_health_paths() -> None:
    # the paths the HTTP front end answers, read from its route table's documentation
    served = set(re.findall(r"GET\s+(/v2/health/\w+)", http_frontend.__doc__ or ""))
    assert served == {"/v2/health/live", "/v2/health/ready"}
    for where, _, c in _kernelport_containers():
        args = [str(a) for a in c["args"]]
        http_port = _arg(args, "--http-port")
        assert http_port is not None, f"{where}: probes need --http-port"
        assert _arg(args, "--http-host") == "0.0.0.0", f"{where}: the kubelet cannot reach 127.0.0.1"
        named = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
        probes = {k: c[k] for k in ("livenessProbe", "readinessProbe", "startupProbe") if k in c}
        assert {"livenessProbe", "readinessProbe"} <= set(probes), where
        for kind, probe in probes.items():
            get = probe["httpGet"]
            port = named.get(get["port"], get["port"])
            assert int(port) == int(http_port), f"{where} {kind}: port {get['port']} is not --http-port {http_port}"
            assert get["path"] in served, f"{where} {kind}: {get['path']}"
        assert probes["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert probes["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_health_paths_are_answered_by_the_front_end() -> None:
    class _NoModels:
        def model_names(self) -> list[str]:
            return []

    fe = http_frontend.HttpFrontend(_NoModels(), port=0)
    try:
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert fe.handle("GET", path, {}, b"").status == 200, path  # type: ignore[arg-type]
        with pytest.raises(http_frontend.HttpError) as err:
            fe.handle("GET", "/v2/health/nothing", {}, b"")  # type: ignore[arg-type]
        assert err.value.status == 404
    finally:
        fe.httpd.server_close()


def test_dev_shm_is_memory_backed() -> None:
    for where, pod, c in _kernelport_containers():
        if "volumes" not in pod:  # a ServingRuntime: KServe builds the pod
            continue
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, where
        empty_dir = volumes[mounts["/dev/shm"]].get("emptyDir")
        assert empty_dir and empty_dir.get("medium") == "Memory" and empty_dir.get("sizeLimit"), where
        socket_dir = str(Path(_arg([str(a) for a in c["args"]], "--socket") or "/tmp/x").parent)
        assert socket_dir in mounts, f"{where}: the socket's directory is not a shared volume"
        others = [o for o in pod["containers"] if o is not c]
        assert any({m["name"] for m in o.get("volumeMounts", [])} >= {mounts[socket_dir], mounts["/dev/shm"]}
                   for o in others), f"{where}: no other container shares the socket and /dev/shm"


def test_kserve_runtime_speaks_v2() -> None:
    docs = [d for p in MANIFESTS for d in _documents(p)]
    runtime = next(d for d in docs if d["kind"] == "ServingRuntime")
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert formats == {"onnx", "pytorch", "tensorflow"}
    args = [str(a) for a in runtime["spec"]["containers"][0]["args"]]
    assert _arg(args, "--model-repository") == "/mnt/models"
    isvc = next(d for d in docs if d["kind"] == "InferenceService")
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
