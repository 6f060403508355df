"""`kernelport bench` as a user runs it: a subprocess against a real served example model (add_sub), on the
local zero-copy path and over gRPC. Each run's request count is checked three ways: the summary table, the
JSON, and the model's statistics read independently with tritonclient. The HTML chart must hold an SVG with
the histogram and percentile series; the PNG must decode (signature, IHDR, IDAT inflated to the size its
dimensions imply, pixels that are not all one colour)."""

from __future__ import annotations

import html.parser
import json
import os
import pty
import select
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import ServerProcess

pytestmark = pytest.mark.timeout(240)

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.fixture(scope="module")
def served(example_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    sock = str(tmp_path_factory.mktemp("bench_sock") / "kp.sock")
    server = ServerProcess.with_ports(example_repo, sock, grpc=True, http=True)
    yield server
    assert server.stop() == 0, server.log()


def _bench(*args: str, stderr: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "kernelport.cli.main", "bench", *args], stdout=subprocess.PIPE,
                          stderr=stderr, text=True, env=env, timeout=180)


def _success_count(grpc_url: str, model: str) -> int:
    c = grpcclient.InferenceServerClient(grpc_url)
    try:
        (s,) = c.get_inference_statistics(model).model_stats
        return int(s.inference_stats.success.count)
    finally:
        c.close()


def _table(stdout: str) -> dict[str, str]:
    """The summary table's header and row, as {column: value}."""
    lines = stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.split()[:3] == ["path", "conc", "batch"])
    head = lines[i].replace(" us", "_us").split()
    return dict(zip(head, lines[i + 1].split()))


class _Svg(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.in_svg = 0
        self.bars: list[dict[str, str]] = []
        self.curves: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "svg":
            self.in_svg += 1
        elif self.in_svg and tag == "rect" and a.get("class") == "bar":
            self.bars.append(a)
        elif self.in_svg and tag == "polyline" and a.get("class") == "percentiles":
            self.curves.append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.in_svg -= 1


def _png(path: str) -> tuple[int, int, np.ndarray]:
    """Decode an 8-bit RGB PNG with filter 0 rows (what `kernelport bench` writes): (width, height, pixels)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert not rows[:, 0].any(), "every row uses filter 0"
    return width, height, rows[:, 1:].reshape(height, width, 3)


def test_local_zero_copy_counts_plots_and_json(served: ServerProcess, tmp_path: os.PathLike[str]) -> None:
    grpc_url = f"127.0.0.1:{served.grpc_port}"
    page, image, doc = (os.path.join(tmp_path, n) for n in ("lat.html", "lat.png", "lat.json"))
    before = _success_count(grpc_url, "add_sub")
    r = _bench("-m", "add_sub", "--socket", served.socket_path, "--path", "local-zero-copy", "-n", "150",
               "--warmup", "7", "--plot", page, "--plot", image, "--json", doc)
    assert r.returncode == 0, r.stdout + r.stderr
    after = _success_count(grpc_url, "add_sub")
    assert after - before == 150 + 7  # the timed requests and the warm-up, as the server counted them
    row = _table(r.stdout)
    assert (row["path"], row["count"], row["errors"], row["conc"]) == ("local-zero-copy", "150", "0", "1")
    assert float(row["p50_us"]) <= float(row["p99_us"]) <= float(row["max_us"])
    assert "150 claims" in r.stdout  # the lane counters over the timed requests
    assert "bench: 100%" in r.stderr  # stderr is not a terminal: plain progress lines
    with open(doc) as f:
        result = json.load(f)
    assert result["count"] == 150 and result["errors"] == {} and result["server"]["claims"] == 150
    assert sum(result["series"]["histogram"]["counts"]) == 150

    with open(page) as f:
        text = f.read()
    svg = _Svg()
    svg.feed(text)
    assert svg.bars and sum(int(b["data-count"]) for b in svg.bars) == 150
    assert len(svg.curves) == 1
    points = svg.curves[0]["data-points"]
    assert int(points) > 10 and "<script" not in text.split("<svg")[0]  # self-contained: loads nothing
    assert "src=" not in text and "href=" not in text

    width, height, pixels = _png(image)
    assert (width, height) == (960, 400)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 3
    assert (pixels == np.array([70, 120, 190], np.uint8)).all(axis=2).sum() > 100  # the histogram's bars


def test_grpc_with_two_clients_matches_server_statistics(served: ServerProcess, tmp_path: os.PathLike[str]) -> None:
    grpc_url = f"127.0.0.1:{served.grpc_port}"
    before = _success_count(grpc_url, "add_sub")
    r = _bench("-m", "add_sub", "--grpc", grpc_url, "-c", "2", "-n", "101", "--warmup", "3", "--json", "-")
    assert r.returncode == 0, r.stdout + r.stderr
    after = _success_count(grpc_url, "add_sub")
    assert after - before == 101 + 2 * 3
    result = json.loads(r.stdout)
    assert (result["path"], result["concurrency"], result["count"]) == ("grpc", 2, 101)
    # the command's own reading of ModelStatistics covers the timed requests only
    assert result["server"]["success"] == 101 and result["server"]["fail"] == 0
    assert _table(r.stderr)["count"] == "101"  # with --json -, the table goes to stderr


def test_progress_bar_on_a_terminal(served: ServerProcess) -> None:
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "kernelport.cli.main", "bench", "-m", "add_sub", "--socket",
                             served.socket_path, "-n", "300", "--path", "local-copy"],
                            stdout=subprocess.PIPE, stderr=slave, text=True, env=env)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    out = proc.communicate(timeout=60)[0]
    os.close(master)
    assert proc.returncode == 0, out + seen.decode(errors="replace")
    text = seen.decode(errors="replace")
    assert "\r[" in text and "300/300 requests" in text and "bench: 100%" not in text
    assert _table(out)["count"] == "300"


def test_unknown_model_and_missing_address_fail_with_a_message(served: ServerProcess) -> None:
    r = _bench("-m", "no_such_model", "--socket", served.socket_path, "-n", "5")
    assert r.returncode == 2 and "no_such_model" in r.stderr
    r = _bench("-m", "add_sub", "--path", "grpc", "-n", "5")
    assert r.returncode == 2 and "--grpc" in r.stderr


def test_http_path_matches_server_statistics(served: ServerProcess) -> None:
    grpc_url = f"127.0.0.1:{served.grpc_port}"
    before = _success_count(grpc_url, "add_sub")
    r = _bench("-m", "add_sub", "--http", f"127.0.0.1:{served.http_port}", "-n", "60", "--warmup", "4", "-b", "3",
               "--json", "-")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _success_count(grpc_url, "add_sub") - before == 64
    result = json.loads(r.stdout)
    assert (result["path"], result["count"], result["batch"]) == ("http", 60, 3)
    # the statistics read over HTTP: 60 requests of 3 samples each
    assert result["server"]["success"] == 60 and result["server"]["inference_count"] == 180
