"""Prometheus metrics on the HTTP port, against a real `kernelport serve --http-port` subprocess.

Every count is checked against the requests this test made (local client and HTTP), and against a second
source read another way: the local client's lane counters, the HTTP statistics endpoint, /proc of the
worker. The text is parsed by a small parser written here (every sample `name{labels} value`, every name
with HELP and TYPE, histograms cumulative).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
import types
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from _clients import claim_then_hang
from conftest import ServerProcess
from kernelport import Client
from kernelport.metrics import MetricFamily, NvmlMetrics, render

pytestmark = pytest.mark.timeout(120)
SPAWN = multiprocessing.get_context("spawn")

# ------------------------------------------------------------------------------------------------------
# a small parser of the Prometheus text format (0.0.4)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
Labels = tuple[tuple[str, str], ...]


@dataclass
class Scrape:
    help: dict[str, str] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def select(self, name: str, **labels: str) -> dict[Labels, float]:
        """Samples of `name` whose labels include `labels`."""
        want = set(labels.items())
        return {lab: v for (n, lab), v in self.samples.items() if n == name and want <= set(lab)}


def _parse_labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m, f"bad labels at {text[pos:]!r}"
        name, raw = m.group(1), m.group(2)
        assert name not in out, f"label {name} twice in {text!r}"
        out[name] = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], raw)
        pos = m.end()
    return out


def parse_metrics(text: str) -> Scrape:
    s = Scrape()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP "):].partition(" ")
            assert name not in s.help, f"HELP of {name} twice"
            s.help[name] = re.sub(r"\\[\\n]", lambda e: _UNESCAPE[e.group(0)], help_text)
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE "):].split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in s.types, f"TYPE of {name} twice"
            assert name in s.help, f"TYPE of {name} before its HELP"
            s.types[name] = kind
        else:
            assert line and not line.startswith("#"), f"unexpected line {line!r}"
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.group(1), _parse_labels(m.group(2) or ""), float(m.group(3))
            family = name
            for suffix in ("_bucket", "_sum", "_count"):
                base = name[: -len(suffix)]
                if name.endswith(suffix) and s.types.get(base) == "histogram":
                    family = base
            assert family in s.types and family in s.help, f"sample {name} has no HELP/TYPE before it"
            if s.types[family] == "histogram" and name == family:
                raise AssertionError(f"histogram {family} sample without suffix")
            if s.types[family] == "counter":
                assert value >= 0, line
            key = (name, tuple(sorted(labels.items())))
            assert key not in s.samples, f"sample {key} twice"
            s.samples[key] = value
    # histograms: buckets cumulative, +Inf equals _count
    for name, kind in s.types.items():
        if kind != "histogram":
            continue
        series: dict[Labels, list[tuple[float, float]]] = {}
        for (n, lab), v in s.samples.items():
            if n == name + "_bucket":
                le = dict(lab)["le"]
                rest = tuple(kv for kv in lab if kv[0] != "le")
                series.setdefault(rest, []).append((math.inf if le == "+Inf" else float(le), v))
        for rest, buckets in series.items():
            buckets.sort()
            counts = [c for _, c in buckets]
            assert counts == sorted(counts), f"{name}{rest}: buckets not cumulative"
            assert buckets[-1][0] == math.inf
            assert buckets[-1][1] == s.samples[(name + "_count", rest)]
            assert (name + "_sum", rest) in s.samples
    return s


# ------------------------------------------------------------------------------------------------------
# the server: the session's served repository plus add_var (variable dims), with HTTP on a free port

ADD_VAR_CONFIG = """name: "add_var"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] },
        { name: "INPUT1" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
"""


def _write_add_var(repo: str) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"])], "add_var",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "n"]) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    os.makedirs(os.path.join(repo, "add_var", "1"))
    onnx.save(model, os.path.join(repo, "add_var", "1", "model.onnx"))
    with open(os.path.join(repo, "add_var", "config.pbtxt"), "w") as f:
        f.write(ADD_VAR_CONFIG)


LANE_SLOTS = 5




@dataclass
class HttpServer:
    process: ServerProcess
    url: str

    @property
    def socket_path(self) -> str:
        return self.process.socket_path


def start_http_server(repo: str, sock: str, *extra: str) -> HttpServer:
    proc = ServerProcess.with_ports(repo, sock, *extra, http=True)
    return HttpServer(proc, f"http://127.0.0.1:{proc.http_port}")


@pytest.fixture(scope="module")
def metrics_repo(served_repo: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("metrics_repository"))
    shutil.copytree(served_repo, path, dirs_exist_ok=True)
    _write_add_var(path)
    return path


@pytest.fixture(scope="module")
def srv(metrics_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    # A long commit timeout, so a claim held on purpose is never abandoned by the worker; one lane per
    # model, so that add_var's second shape evicts its first lane.
    sock = str(tmp_path_factory.mktemp("metrics_sock") / "kp.sock")
    server = start_http_server(metrics_repo, sock, "--commit-timeout-ms", "20000", "--max-lanes-per-model", "1",
                               "--restart-backoff-ms", "50", "--lane-slots", str(LANE_SLOTS))
    yield server
    code = server.process.stop()
    assert code == 0, server.process.log()
    assert "Traceback" not in server.process.log(), server.process.log()


@pytest.fixture
def client(srv: HttpServer) -> Iterator[Client]:
    with Client(srv.socket_path) as c:
        yield c


def scrape(srv: HttpServer) -> Scrape:
    with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_metrics(r.read().decode("utf-8"))


def _until(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll an observable server state (each poll a round trip), never a sleep to synchronise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        threading.Event().wait(0.05)
    return False


def _rand(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _http_infer(srv: HttpServer, model: str, a: np.ndarray, b: np.ndarray, binary: bool) -> dict[str, np.ndarray]:
    """One add_sub request over HTTP: JSON tensors, or the binary tensor extension both ways."""
    inputs = []
    for name, x in (("INPUT0", a), ("INPUT1", b)):
        t: dict = {"name": name, "shape": list(x.shape), "datatype": "FP32"}
        if binary:
            t["parameters"] = {"binary_data_size": x.nbytes}
        else:
            t["data"] = x.reshape(-1).tolist()
        inputs.append(t)
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": binary}}).encode()
    body = header + (a.tobytes() + b.tobytes() if binary else b"")
    req = urllib.request.Request(srv.url + f"/v2/models/{model}/infer", data=body, method="POST")
    if binary:
        req.add_header("Inference-Header-Content-Length", str(len(header)))
    with urllib.request.urlopen(req, timeout=30) as r:
        data = r.read()
        n = int(r.headers.get("Inference-Header-Content-Length") or len(data))
    doc = json.loads(data[:n])
    out, pos = {}, n
    for o in doc["outputs"]:
        if "data" in o:
            out[o["name"]] = np.array(o["data"], np.float32).reshape(o["shape"])
        else:
            size = o["parameters"]["binary_data_size"]
            out[o["name"]] = np.frombuffer(data[pos:pos + size], np.float32).reshape(o["shape"])
            pos += size
    return out


# ------------------------------------------------------------------------------------------------------
# the text format


def test_exposition_escapes_labels_and_help() -> None:
    tricky = 'a "quoted" \\ back\\slash\nand a newline'
    fam = MetricFamily("kp_test_total", "counter", "help with \\ and\nnewline")
    fam.add(3, {"model": tricky, "version": "1"})
    hist = MetricFamily("kp_test_sizes", "histogram", "sizes")
    hist.add_histogram({"model": "m"}, [(1.0, 2), (2.0, 5)], total=12, count=6)
    text = render([fam, hist])
    assert "\n" not in text.split("\n", 2)[0]  # the help's newline is escaped
    s = parse_metrics(text)
    assert s.help["kp_test_total"] == "help with \\ and\nnewline"
    assert s.value("kp_test_total", model=tricky, version="1") == 3
    assert s.value("kp_test_sizes_bucket", model="m", le="2") == 5
    assert s.value("kp_test_sizes_bucket", model="m", le="+Inf") == 6
    assert s.value("kp_test_sizes_sum", model="m") == 12
    with pytest.raises(ValueError):
        MetricFamily("bad-name", "counter", "x")
    with pytest.raises(ValueError):
        MetricFamily("kp_x", "counter", "x").add(1, {"bad-label": "v"})


def test_metrics_parse_and_cover_every_model(srv: HttpServer, metrics_repo: str) -> None:
    s = scrape(srv)
    models = {d for d in os.listdir(metrics_repo) if os.path.isfile(os.path.join(metrics_repo, d, "config.pbtxt"))}
    for name in ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                 "nv_inference_exec_count", "nv_inference_pending_request_count", "nv_inference_request_duration_us",
                 "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
                 "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
                 "nv_model_load_duration_secs", "kp_batch_size", "kp_model_state", "kp_lanes", "kp_lane_slots",
                 "kp_lane_occupancy_ratio", "kp_client_sleeps_total", "kp_worker_sleeps_total",
                 "kp_commit_timeouts_total", "kp_abandoned_rows_total", "kp_worker_resident_memory_bytes",
                 "kp_worker_crashes_total", "kp_model_restarts_total"):
        assert name in s.types, name
    assert s.types["nv_inference_request_success"] == "counter"
    assert s.types["nv_inference_pending_request_count"] == "gauge"
    assert s.types["kp_batch_size"] == "histogram"
    for m in models:
        assert s.value("kp_model_state", model=m, state="READY") == 1, m
        assert sum(s.select("kp_model_state", model=m).values()) == 1, m
        assert s.value("nv_model_load_duration_secs", model=m, version="1") > 0
        assert s.select("nv_inference_request_success", model=m, version="1"), m
    # no NVML here: no GPU metric at all (with a GPU and pynvml, see test_gpu_metrics_from_nvml)
    if NvmlMetrics.create() is None:
        assert not [n for n in s.types if n.startswith("nv_gpu_") or n == "nv_energy_consumption"]


def test_metrics_match_requests(srv: HttpServer, client: Client) -> None:
    model = "add_sub"
    local_batches = [1, 3, 2, 5]
    zero_copy_batch = 4
    http_batches = [(2, False), (1, False), (6, True), (16, True)]
    concurrent = [1, 2, 1, 3, 1, 1, 2, 1]  # local requests at once, so that some may share a batch
    before = scrape(srv)
    stats_before = _stats(srv, model)
    for i, n in enumerate(local_batches):
        a, b = _rand(n, 16, seed=i), _rand(n, 16, seed=50 + i)
        np.testing.assert_array_equal(client.infer(model, {"INPUT0": a, "INPUT1": b})["OUTPUT0"], a + b)
    a, b = _rand(zero_copy_batch, 16, seed=7), _rand(zero_copy_batch, 16, seed=8)
    with client.request(model, batch=zero_copy_batch) as req:
        req.inputs["INPUT0"][:] = a
        req.inputs["INPUT1"][:] = b
        np.testing.assert_array_equal(req.run()["OUTPUT1"], a - b)
    for i, (n, binary) in enumerate(http_batches):
        a, b = _rand(n, 16, seed=100 + i), _rand(n, 16, seed=150 + i)
        out = _http_infer(srv, model, a, b, binary)
        np.testing.assert_array_equal(out["OUTPUT0"], a + b)
        np.testing.assert_array_equal(out["OUTPUT1"], a - b)
    errors: list[BaseException] = []

    def one(i: int, n: int) -> None:
        try:
            with Client(srv.socket_path) as c:
                a, b = _rand(n, 16, seed=200 + i), _rand(n, 16, seed=250 + i)
                np.testing.assert_array_equal(c.infer(model, {"INPUT0": a, "INPUT1": b})["OUTPUT0"], a + b)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, n)) for i, n in enumerate(concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    after = scrape(srv)
    counters = client.counters(model)  # the lane counters, read another way (the local socket)
    stats_after = _stats(srv, model)

    requests = len(local_batches) + 1 + len(http_batches) + len(concurrent)
    samples = sum(local_batches) + zero_copy_batch + sum(n for n, _ in http_batches) + sum(concurrent)
    lab = {"model": model, "version": "1"}

    def delta(name: str, **extra: str) -> float:
        return after.value(name, **lab, **extra) - before.value(name, **lab, **extra)

    assert delta("nv_inference_request_success") == requests
    assert delta("nv_inference_request_failure", reason="BACKEND") == 0
    assert delta("nv_inference_count") == samples
    executions = delta("nv_inference_exec_count")
    assert 1 <= executions <= requests
    assert after.value("nv_inference_pending_request_count", **lab) == 0
    assert delta("kp_lane_claims_total") == requests
    assert after.value("kp_lane_claims_total", **lab) == counters["claims"]
    assert after.value("kp_lane_batches_total", **lab) == counters["batches"]
    assert after.value("kp_client_sleeps_total", **lab) <= counters["client_sleeps"]
    # the histogram: one count per execution, its sum the rows executed, per size as the statistics say
    assert delta("kp_batch_size_count") == executions
    assert delta("kp_batch_size_sum") == samples
    assert delta("kp_lane_batch_rows_total") == samples
    by_size = {b["batch_size"]: b["compute_infer"]["count"] for b in stats_after["batch_stats"]}
    by_size_before = {b["batch_size"]: b["compute_infer"]["count"] for b in stats_before["batch_stats"]}
    for le in range(1, 17):
        expected = sum(c - by_size_before.get(size, 0) for size, c in by_size.items() if size <= le)
        assert delta("kp_batch_size_bucket", le=str(le)) == expected, le
    assert delta("kp_batch_size_bucket", le="16") == executions
    # the durations, in microseconds, as the statistics endpoint says in nanoseconds
    st_a, st_b = stats_after["inference_stats"], stats_before["inference_stats"]
    for metric, key in (("nv_inference_request_duration_us", "success"), ("nv_inference_queue_duration_us", "queue"),
                        ("nv_inference_compute_infer_duration_us", "compute_infer")):
        assert after.value(metric, **lab) == st_a[key]["ns"] // 1000, metric
        assert delta(metric) >= 0
    assert delta("nv_inference_request_duration_us") > 0
    assert delta("nv_inference_compute_infer_duration_us") <= delta("nv_inference_request_duration_us") + 1
    assert delta("nv_inference_queue_duration_us") <= delta("nv_inference_request_duration_us") + 1
    assert after.value("nv_inference_compute_input_duration_us", **lab) == 0
    assert st_a["success"]["count"] - st_b["success"]["count"] == requests
    occupancy = after.value("kp_lane_occupancy_ratio", **lab)
    assert occupancy == pytest.approx(counters["rows"] / (counters["batches"] * 16))
    assert after.value("kp_lanes", **lab) == 1
    assert after.value("kp_lane_slots", **lab) == LANE_SLOTS


def _stats(srv: HttpServer, model: str) -> dict:
    with urllib.request.urlopen(srv.url + f"/v2/models/{model}/stats", timeout=30) as r:
        (ms,) = json.loads(r.read())["model_stats"]
    return ms


def test_pending_requests_and_abandoned_rows(srv: HttpServer, client: Client) -> None:
    model = "add_sub_window"  # 50 ms window; the server's commit timeout is 20 s
    lab = {"model": model, "version": "1"}
    start = scrape(srv)
    assert start.value("nv_inference_pending_request_count", **lab) == 0
    with client.request(model, batch=1) as req:  # claimed, not committed: pending
        req.inputs["INPUT0"][:] = 1.0
        req.inputs["INPUT1"][:] = 2.0
        assert scrape(srv).value("nv_inference_pending_request_count", **lab) == 1
        np.testing.assert_array_equal(req.run()["OUTPUT0"], np.full((1, 16), 3.0, np.float32))
    s = scrape(srv)
    assert s.value("nv_inference_pending_request_count", **lab) == 0
    assert s.value("nv_inference_request_success", **lab) == start.value("nv_inference_request_success", **lab) + 1

    # a client that claims and dies: pending while it lives, then its row is abandoned, never counted as done
    parent, child = SPAWN.Pipe()
    p = SPAWN.Process(target=claim_then_hang, args=(srv.socket_path, model, child, False), daemon=True)
    p.start()
    try:
        assert parent.poll(60) and parent.recv() == "claimed"
        assert scrape(srv).value("nv_inference_pending_request_count", **lab) == 1
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    assert _until(lambda: scrape(srv).value("kp_abandoned_rows_total", **lab)
                  == start.value("kp_abandoned_rows_total", **lab) + 1)
    s = scrape(srv)
    assert s.value("nv_inference_pending_request_count", **lab) == 0
    assert s.value("nv_inference_request_success", **lab) == start.value("nv_inference_request_success", **lab) + 1
    assert s.value("kp_lane_claims_total", **lab) == start.value("kp_lane_claims_total", **lab) + 2


def test_worker_memory_from_proc(srv: HttpServer, client: Client) -> None:
    status = client.server_status()
    s = scrape(srv)
    for model, st in status.items():
        assert s.value("kp_workers", model=model, version="1") == len(st["workers"])
        for i, pid in enumerate(st["workers"]):
            with open(f"/proc/{pid}/status") as f:
                (kb,) = [int(line.split()[1]) for line in f if line.startswith("VmRSS:")]
            rss = s.value("kp_worker_resident_memory_bytes", model=model, version="1", instance=str(i))
            # an idle worker's RSS barely moves between the two reads
            assert abs(rss - kb * 1024) <= max(16 << 20, 0.1 * rss), (model, rss, kb)
            assert rss > 10 << 20  # a worker holds at least the Python runtime and ONNX Runtime


def test_lane_eviction_keeps_counters_monotonic(srv: HttpServer, client: Client) -> None:
    model = "add_var"  # dims [-1]: every length is its own lane; the server keeps one lane per model
    lab = {"model": model, "version": "1"}
    claims = [scrape(srv).value("kp_lane_claims_total", **lab)]
    for i, length in enumerate((3, 5, 3, 7)):
        a, b = _rand(2, length, seed=i), _rand(2, length, seed=10 + i)
        np.testing.assert_array_equal(client.infer(model, {"INPUT0": a, "INPUT1": b})["OUTPUT0"], a + b)
        s = scrape(srv)
        claims.append(s.value("kp_lane_claims_total", **lab))
        assert s.value("kp_lanes", **lab) == 1
        assert s.value("kp_lane_batch_rows_total", **lab) == s.value("nv_inference_count", **lab)
    assert claims == [claims[0] + i for i in range(5)]
    assert client.counters(model)["claims"] == claims[-1]


def test_worker_crash_and_restart_counters(srv: HttpServer, client: Client) -> None:
    model = "add_sub_full"
    lab = {"model": model, "version": "1"}
    a = np.ones((16, 16), np.float32)  # a full batch closes at once
    np.testing.assert_array_equal(client.infer(model, {"INPUT0": a, "INPUT1": a})["OUTPUT0"], a * 2)
    before = scrape(srv)
    assert before.value("nv_inference_request_success", **lab) >= 1
    assert before.value("kp_worker_crashes_total", **lab) == 0
    pid = client.server_status()[model]["workers"][0]
    os.kill(pid, signal.SIGKILL)
    assert _until(lambda: scrape(srv).value("kp_model_restarts_total", **lab) == 1)
    assert _until(lambda: client.server_status()[model]["state"] == "READY")
    s = scrape(srv)
    assert s.value("kp_worker_crashes_total", **lab) == 1
    assert s.value("kp_model_state", model=model, state="READY") == 1
    assert client.server_status()[model]["workers"][0] != pid
    # the restarted workers keep a new statistics block: Triton's counters start again (a counter reset)
    assert s.value("nv_inference_request_success", **lab) == 0
    np.testing.assert_array_equal(client.infer(model, {"INPUT0": a, "INPUT1": a})["OUTPUT0"], a * 2)
    assert scrape(srv).value("nv_inference_request_success", **lab) == 1


def test_metrics_survive_concurrent_scrapes_under_load(srv: HttpServer, client: Client) -> None:
    stop = threading.Event()
    failures: list[BaseException] = []

    def scraper() -> None:
        while not stop.is_set():
            try:
                scrape(srv)
            except BaseException as e:
                failures.append(e)
                return

    threads = [threading.Thread(target=scraper) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(100):
            a, b = _rand(1, 16, seed=i), _rand(1, 16, seed=500 + i)
            np.testing.assert_array_equal(client.infer("add_sub", {"INPUT0": a, "INPUT1": b})["OUTPUT0"], a + b)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures


# ------------------------------------------------------------------------------------------------------
# GPU metrics


def _nvml_device() -> bool:
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount()) > 0
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _nvml_device(), reason="needs pynvml and an NVIDIA GPU")
def test_gpu_metrics_from_nvml() -> None:
    import pynvml

    gpu = NvmlMetrics.create()
    assert gpu is not None
    try:
        s = parse_metrics(render(gpu.collect()))
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        uuid = pynvml.nvmlDeviceGetUUID(h)
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        assert s.value("nv_gpu_memory_total_bytes", gpu_uuid=uuid) == pynvml.nvmlDeviceGetMemoryInfo(h).total
        assert 0 <= s.value("nv_gpu_utilization", gpu_uuid=uuid) <= 1
    finally:
        gpu.close()


def test_gpu_metrics_rendering_with_a_stand_in_nvml() -> None:
    """No GPU here: the rendering path runs against a stand-in module with NVML's function names and
    units (percent, bytes, milliwatts, millijoules). The real library is exercised by the gpu test above."""

    def unsupported(_h: object) -> float:
        raise RuntimeError("NVMLError_NotSupported")

    fake = types.SimpleNamespace(
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=37, memory=5),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=80 << 30, used=3 << 30, free=77 << 30),
        nvmlDeviceGetPowerUsage=lambda h: 71500,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700000,
        nvmlDeviceGetTotalEnergyConsumption=unsupported,
        nvmlShutdown=lambda: None,
    )
    s = parse_metrics(render(NvmlMetrics(fake, [("GPU-1234", object())]).collect()))
    assert s.value("nv_gpu_utilization", gpu_uuid="GPU-1234") == pytest.approx(0.37)
    assert s.value("nv_gpu_memory_total_bytes", gpu_uuid="GPU-1234") == 80 << 30
    assert s.value("nv_gpu_memory_used_bytes", gpu_uuid="GPU-1234") == 3 << 30
    assert s.value("nv_gpu_power_usage", gpu_uuid="GPU-1234") == pytest.approx(71.5)
    assert s.value("nv_gpu_power_limit", gpu_uuid="GPU-1234") == pytest.approx(700.0)
    assert not s.select("nv_energy_consumption")  # not supported: left out, the rest still served
