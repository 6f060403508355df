"""Shared fixtures. Add yours below; keep each one small and say what it builds."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from kernelport.examples import build_example_repository
from kernelport.server.process import ServerProcess, free_port  # noqa: F401 (tests import them from here)


# The example model repository (add_sub, add_sub_nobatch, mlp, identity_16m), built once per test session.
@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("model_repository")
    build_example_repository(str(path))
    return str(path)


# ---- a real `kernelport serve` subprocess ------------------------------------------------------------


# Test-only variants of add_sub, to see each way a batch closes.
TEST_VARIANTS = {
    # a partial batch closes when the window (50 ms) since its first claim expires
    "add_sub_window": "dynamic_batching {\n  max_queue_delay_microseconds: 50000\n}\n",
    # a batch closes at once when it reaches the preferred size 4, long before the 30 s window
    "add_sub_preferred": (
        "dynamic_batching {\n  preferred_batch_size: [ 4 ]\n  max_queue_delay_microseconds: 30000000\n}\n"
    ),
    # a batch closes at once when it is full (16 rows), long before the 30 s window
    "add_sub_full": "dynamic_batching {\n  max_queue_delay_microseconds: 30000000\n}\n",
}


def add_sub_variant(repo: str, name: str, batching: str) -> None:
    src = os.path.join(repo, "add_sub")
    dst = os.path.join(repo, name)
    os.makedirs(os.path.join(dst, "1"), exist_ok=True)
    shutil.copy(os.path.join(src, "1", "model.onnx"), os.path.join(dst, "1", "model.onnx"))
    with open(os.path.join(src, "config.pbtxt")) as f:
        text = f.read()
    head = text.split("dynamic_batching")[0].replace('name: "add_sub"', f'name: "{name}"')
    with open(os.path.join(dst, "config.pbtxt"), "w") as f:
        f.write(head + batching)


@pytest.fixture(scope="session")
def served_repo(tmp_path_factory: pytest.TempPathFactory, example_repo: str) -> str:
    """The example repository plus the test-only add_sub variants."""
    path = str(tmp_path_factory.mktemp("served_repository"))
    shutil.copytree(example_repo, path, dirs_exist_ok=True)
    for name, batching in TEST_VARIANTS.items():
        add_sub_variant(path, name, batching)
    return path


@pytest.fixture(scope="session")
def server(served_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the session, serving `served_repo`."""
    sock = str(tmp_path_factory.mktemp("sock") / "kp.sock")
    srv = ServerProcess(served_repo, sock)
    yield srv
    code = srv.stop()
    assert code == 0, srv.log()


def child_pids(pid: int) -> list[int]:
    """The processes a process started (its workers), from /proc."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return found
