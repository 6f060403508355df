"""A TorchScript mlp for the GPU tests and the GPU benchmark (the example repository's mlp, in torch):
INPUT__0 FP32 [512] -> Linear 512x2048 -> ReLU -> Linear 2048x512 -> OUTPUT__0 FP32 [512]."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

__all__ = ["mlp_reference", "write_torch_mlp"]

HIDDEN = 2048
WIDTH = 512


def _weights(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w1": (rng.standard_normal((WIDTH, HIDDEN)) / np.sqrt(WIDTH)).astype(np.float32),
            "b1": rng.standard_normal(HIDDEN).astype(np.float32) * 0.1,
            "w2": (rng.standard_normal((HIDDEN, WIDTH)) / np.sqrt(HIDDEN)).astype(np.float32),
            "b2": rng.standard_normal(WIDTH).astype(np.float32) * 0.1}


def mlp_reference(x: np.ndarray, seed: int = 7) -> np.ndarray:
    """The mlp in float64 numpy: the reference a GPU result is compared with."""
    w = {k: v.astype(np.float64) for k, v in _weights(seed).items()}
    return np.maximum(x.astype(np.float64) @ w["w1"] + w["b1"], 0.0) @ w["w2"] + w["b2"]


def write_torch_mlp(repo: str, name: str, *, instance_group: str = "instance_group [ { kind: KIND_GPU } ]",
                    max_batch_size: int = 8, extra: str = "", seed: int = 7) -> str:
    """Write `<repo>/<name>/1/model.pt` and its config; returns the model directory."""
    import torch

    w = _weights(seed)

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(WIDTH, HIDDEN)
            self.l2 = torch.nn.Linear(HIDDEN, WIDTH)
            with torch.no_grad():
                self.l1.weight.copy_(torch.from_numpy(w["w1"].T.copy()))
                self.l1.bias.copy_(torch.from_numpy(w["b1"]))
                self.l2.weight.copy_(torch.from_numpy(w["w2"].T.copy()))
                self.l2.bias.copy_(torch.from_numpy(w["b2"]))

        def forward(self, x: Any) -> Any:
            return self.l2(torch.relu(self.l1(x)))

    path = os.path.join(repo, name)
    os.makedirs(os.path.join(path, "1"), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates TorchScript; Triton repositories hold model.pt
        traced = torch.jit.trace(Mlp().eval(), torch.zeros(2, WIDTH))
    traced.save(os.path.join(path, "1", "model.pt"))
    with open(os.path.join(path, "config.pbtxt"), "w") as f:
        f.write(f'name: "{name}"\nplatform: "pytorch_libtorch"\nmax_batch_size: {max_batch_size}\n'
                f'input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]\n'
                f'output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]\n'
                f"dynamic_batching {{ max_queue_delay_microseconds: 0 }}\n{instance_group}\n{extra}\n")
    return path
