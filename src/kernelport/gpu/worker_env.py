"""The worker's entry point when the server places it on a device: its environment first, then the worker.

CUDA reads CUDA_VISIBLE_DEVICES once, when a process first initialises it, so the placement's variables must
be in `os.environ` before the worker imports any framework. The spawned child runs this function (importing
only this small module), sets them, and hands over to `kernelport.workers.main.worker_main`.
"""

from __future__ import annotations

import os
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["placed_worker_main"]


def placed_worker_main(conn: Connection, params: dict[str, Any]) -> None:
    env = dict(params.pop("env", None) or {})
    for key, value in env.items():
        os.environ[str(key)] = str(value)
    from kernelport.workers.main import worker_main

    worker_main(conn, params)
