"""`kernelport serve` shows progress while models load: a line as each model starts loading ("loading
model 'm' (i of n)"), then one when it is loaded with its time, or, for a model that fails, the failure
with its time; all before the ready line."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from conftest import ServerProcess

pytestmark = pytest.mark.timeout(120)


def test_a_line_per_model_as_it_loads(example_repo: str, tmp_path: os.PathLike[str]) -> None:
    repo = os.path.join(tmp_path, "repo")
    for name in ("add_sub", "add_sub_nobatch"):
        shutil.copytree(os.path.join(example_repo, name), os.path.join(repo, name))
    os.makedirs(os.path.join(repo, "corrupt", "1"))
    with open(os.path.join(example_repo, "add_sub", "config.pbtxt")) as f:
        config = f.read().replace('name: "add_sub"', 'name: "corrupt"')
    with open(os.path.join(repo, "corrupt", "config.pbtxt"), "w") as f:
        f.write(config)
    with open(os.path.join(repo, "corrupt", "1", "model.onnx"), "wb") as f:
        f.write(b"not an onnx model")
    server = ServerProcess(repo, os.path.join(tmp_path, "kp.sock"))
    try:
        lines = server.log().splitlines()
    finally:
        assert server.stop() == 0, server.log()
    ready = next(i for i, line in enumerate(lines) if "ready on" in line)
    starts = [(i, m.group(1), int(m.group(2)), int(m.group(3))) for i, line in enumerate(lines)
              if (m := re.search(r"loading model '(\w+)' \((\d+) of (\d+)\)", line))]
    assert [(name, k, n) for _, name, k, n in starts] == [("add_sub", 1, 3), ("add_sub_nobatch", 2, 3),
                                                          ("corrupt", 3, 3)]
    ends = {}
    for i, line in enumerate(lines):
        m = re.search(r"loaded model '(\w+)' \(.*\) in (\d+\.\d\d) s", line) or \
            re.search(r"model '(\w+)' not loaded \(after (\d+\.\d\d) s\)", line)
        if m:
            ends[m.group(1)] = (i, float(m.group(2)))
    assert set(ends) == {"add_sub", "add_sub_nobatch", "corrupt"}
    for start, name, _, _ in starts:
        end, seconds = ends[name]
        assert start < end < ready and seconds >= 0  # each model: its start line, then its end line
    assert "not loaded" in lines[ends["corrupt"][0]]
