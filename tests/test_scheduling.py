"""Scheduling between requests of one model: priority levels run first, tenants share by weight.

The model is a TorchScript "ticket" counter: every run increments a buffer and returns it, so each
request's output says exactly when it ran relative to the others (execution order by count, never by
time). To queue requests deterministically, a "blocker" request is claimed and left uncommitted: the
worker takes its batch and waits for the commit, the test queues the others behind it (submitted, not
waited for), then commits the blocker and reads every ticket.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import ServerProcess
from kernelport import Client, InvalidInputError, QueueFullError

torch = pytest.importorskip("torch", reason="the scheduling tests use a TorchScript model")

pytestmark = pytest.mark.timeout(240)

COMMON = """platform: "pytorch_libtorch"
max_batch_size: 1
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_INT64 dims: [ 1 ] } ]
parameters { key: "inference_mode" value: { string_value: "false" } }
parameters { key: "kernelport.commit_timeout_microseconds" value: { string_value: "30000000" } }
parameters { key: "kernelport.lane_slots" value: { string_value: "16" } }
"""

MODELS = {
    "ticket_prio": (0, "dynamic_batching { priority_levels: 2 default_priority_level: 2 }\n"),
    "ticket_fair": (0, "dynamic_batching { }\n"
                       'parameters { key: "kernelport.tenant_weights" value: { string_value: "gold:3,bronze:1" } }\n'),
    "ticket_equal": (0, "dynamic_batching { }\n"),
    # about a millisecond of work per run, so that a waiting tenant is always queued again in time
    "ticket_flood": (40, "dynamic_batching { }\n"),
    # level 1 has a queue of its own (2 places); the default level shares the model's (3 places)
    "ticket_levels": (0, "dynamic_batching { priority_levels: 2 default_priority_level: 2\n"
                         "  default_queue_policy { max_queue_size: 3 }\n"
                         "  priority_queue_policy { key: 1 value: { max_queue_size: 2 } } }\n"),
    # two instances: one can be held while the other serves
    "ticket_pair": (0, "dynamic_batching { }\ninstance_group [ { count: 2 kind: KIND_CPU } ]\n"),
    # two models confined to one CPU, one of them at a tenth of the default CPU weight
    "share_heavy": (40, 'parameters { key: "kernelport.cpus" value: { string_value: "0" } }\n'),
    "share_light": (40, 'parameters { key: "kernelport.cpus" value: { string_value: "0" } }\n'
                        'parameters { key: "kernelport.model_weight" value: { string_value: "110" } }\n'),
}


class Ticket(torch.nn.Module):
    def __init__(self, work: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("w", torch.full((96, 96), 0.01))
        self.work = work

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count.add_(1)
        y = self.w
        for _ in range(self.work):
            y = torch.mm(y, self.w)
        return (x * 0).to(torch.int64) + self.count + (y[0, 0] * 0).to(torch.int64)


@pytest.fixture(scope="module")
def sched_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("sched_repo")
    for name, (work, extra) in MODELS.items():
        os.makedirs(repo / name / "1")
        torch.jit.script(Ticket(work)).save(str(repo / name / "1" / "model.pt"))
        (repo / name / "config.pbtxt").write_text(f'name: "{name}"\n' + COMMON + extra)
    srv = ServerProcess.with_ports(str(repo), str(tmp_path_factory.mktemp("sched") / "kp.sock"), grpc=True,
                                   http=True)
    yield srv
    assert srv.stop() == 0, srv.log()


X = np.zeros((1, 1), np.float32)


def _queue(c: Client, model: str, specs: list[dict]) -> list[int]:
    """Hold the model's worker with a claimed, uncommitted blocker; queue a request per spec (keyword
    arguments of Client.request) behind it; release the blocker; return each request's ticket."""
    # map each class's lane first (a new lane needs the worker, which the blocker will hold), in order of
    # first appearance: the worker's list of lanes then favours the early classes, which the scheduler
    # must overrule
    classes = dict.fromkeys(tuple(sorted(kw.items())) for kw in specs)
    for kw in classes:
        c.infer(model, {"x": X}, **dict(kw))
    blocker = c.request(model, batch=1)
    blocker.inputs["x"][:] = 0
    deadline = 200
    while not blocker.taken:  # the worker took the blocker's batch and now waits for its commit
        deadline -= 1
        assert deadline > 0, "the worker never took the blocker"
        threading.Event().wait(0.05)
    reqs = []
    for kw in specs:
        r = c.request(model, batch=1, **kw)
        r.inputs["x"][:] = 0
        r.submit()
        reqs.append(r)
    first = int(blocker.run()["OUTPUT__0"][0, 0])
    tickets = []
    for r in reqs:
        tickets.append(int(r.run()["OUTPUT__0"][0, 0]))
        r.release()
    blocker.release()
    assert all(t > first for t in tickets)
    assert len(set(tickets)) == len(tickets), tickets  # one run each: max_batch_size 1
    return tickets


def _order(tickets: list[int], labels: list[str]) -> str:
    """The labels in execution order."""
    return "".join(label for _, label in sorted(zip(tickets, labels)))


def test_higher_priority_runs_first(sched_server: ServerProcess) -> None:
    # queued in arrival order low, high, low, high, ...: every high (1) runs before any low (2)
    specs = [{"priority": 2}, {"priority": 1}] * 4
    with Client(sched_server.socket_path) as c:
        tickets = _queue(c, "ticket_prio", specs)
    assert _order(tickets, ["L", "H"] * 4) == "HHHHLLLL"


def test_priority_zero_and_out_of_range_mean_the_default_level(sched_server: ServerProcess) -> None:
    # default level 2: priority 0 and 7 queue with the 2s, behind every 1
    specs = [{"priority": 0}, {"priority": 7}, {"priority": 1}, {"priority": 2}, {"priority": 1}]
    with Client(sched_server.socket_path) as c:
        tickets = _queue(c, "ticket_prio", specs)
    order = _order(tickets, ["d", "d", "H", "d", "H"])
    assert order == "HHddd", order


def test_tenants_share_by_weight(sched_server: ServerProcess) -> None:
    # gold weighs 3, bronze 1: while both have requests queued, gold gets three runs of every four
    specs = [{"tenant": "gold"}, {"tenant": "bronze"}] * 12
    with Client(sched_server.socket_path) as c:
        tickets = _queue(c, "ticket_fair", specs)
        order = _order(tickets, ["g", "b"] * 12)
        assert order[:16].count("g") == 12, order  # both backlogged for the first 16 runs
        assert order[16:] == "b" * 8, order  # then bronze alone
        for i in range(0, 16, 4):  # and the shares hold at every point, not just in total
            assert order[i:i + 4].count("g") in (2, 3, 4), order
        counts = c.tenant_counters("ticket_fair")
    assert counts["gold"]["claims"] >= 12 and counts["bronze"]["claims"] >= 12


def test_equal_weights_alternate_against_a_backlog(sched_server: ServerProcess) -> None:
    # one tenant queued 12 requests before the other's 4 arrived: a FIFO would run all 12 first
    specs = [{"tenant": "flood"}] * 12 + [{"tenant": "calm"}] * 4
    with Client(sched_server.socket_path) as c:
        tickets = _queue(c, "ticket_equal", specs)
    order = _order(tickets, ["f"] * 12 + ["c"] * 4)
    assert order[:8].count("c") == 4, order


def test_flooding_tenant_gets_its_share_of_executions(sched_server: ServerProcess) -> None:
    """Eight closed-loop clients of one tenant against two of another, equal weights, on one instance:
    while both are active each gets about half of the runs (first-come first-served would give the
    flood four in five)."""
    model = "ticket_flood"
    stop = threading.Event()
    runs: dict[str, list[int]] = {"flood": [], "calm": []}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def loop(tenant: str) -> None:
        try:
            with Client(sched_server.socket_path, tenant=tenant) as c:
                while not stop.is_set():
                    t = int(c.infer(model, {"x": X})["OUTPUT__0"][0, 0])
                    with lock:
                        runs[tenant].append(t)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=loop, args=("flood",)) for _ in range(8)]
    threads += [threading.Thread(target=loop, args=("calm",)) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = 600
        while deadline:
            with lock:
                if len(runs["calm"]) >= 150:
                    break
            deadline -= 1
            threading.Event().wait(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    # count the runs between the calm tenant's 20th and its last-but-20th: both were busy throughout
    calm = sorted(runs["calm"])
    assert len(calm) >= 60, f"too few runs to judge: {len(calm)}"
    lo, hi = calm[20], calm[-20]
    flood = sum(1 for t in runs["flood"] if lo <= t <= hi)
    mine = sum(1 for t in calm if lo <= t <= hi)
    share = flood / (flood + mine)
    assert share <= 0.6, f"the flooding tenant got {share:.0%} of {flood + mine} runs (fair: 50%, FIFO: 80%)"
    with Client(sched_server.socket_path) as c:
        counts = c.tenant_counters(model)
    assert counts["calm"]["rows"] == pytest.approx(len(runs["calm"]), abs=2)


def test_bad_tenant_and_priority_are_invalid_input(sched_server: ServerProcess) -> None:
    with Client(sched_server.socket_path) as c:
        with pytest.raises(InvalidInputError, match="tenant .* is not valid"):
            c.infer("ticket_equal", {"x": X}, tenant="no spaces allowed")
        # and the model still answers
        assert c.infer("ticket_equal", {"x": X})["OUTPUT__0"].shape == (1, 1)


def test_priority_and_tenant_over_grpc_and_http(sched_server: ServerProcess) -> None:
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{sched_server.grpc_port}")
    inp = grpcclient.InferInput("x", [1, 1], "FP32")
    inp.set_data_from_numpy(X)
    assert "schedule_policy" in g.get_server_metadata().extensions
    before = g.get_inference_statistics("ticket_fair").model_stats[0].inference_count
    g.infer("ticket_fair", [inp], priority=1, headers={"kernelport-tenant": "gold"})
    g.infer("ticket_fair", [inp], headers={"kernelport-tenant": "silver"})
    with pytest.raises(Exception, match="tenant"):
        g.infer("ticket_fair", [inp], headers={"kernelport-tenant": "bad tenant"})
    h = httpclient.InferenceServerClient(f"127.0.0.1:{sched_server.http_port}")
    hin = httpclient.InferInput("x", [1, 1], "FP32")
    hin.set_data_from_numpy(X)
    h.infer("ticket_fair", [hin], headers={"kernelport-tenant": "silver"})
    after = g.get_inference_statistics("ticket_fair").model_stats[0].inference_count
    assert after - before == 3
    with Client(sched_server.socket_path) as c:
        counts = c.tenant_counters("ticket_fair")
    assert counts["silver"]["claims"] == 2


def test_scheduler_in_process_follows_levels_then_weights() -> None:
    """The worker's choice, on lanes in this process: level 1 before level 2; within level 2, classes
    weighted 2:1 share the runs 2:1 while both have work; a class that was idle gets no saved credit."""
    import _kpcore as k

    bell = k.Doorbell(k.Segment.create(k.DOORBELL_BYTES), init=True)

    def lane() -> k.Lane:
        return k.Lane(k.Segment.create(k.Lane.required_size(32, 1, [64])), bell, 32, 1, [64], init=True)

    lanes = [lane() for _ in range(3)]
    sched = k.Scheduler()
    sched.set_lane(0, 2, 1, 1)  # level 2, class 1, weight 1
    sched.set_lane(1, 2, 2, 2)  # level 2, class 2, weight 2
    sched.set_lane(2, 1, 3, 1)  # level 1
    owner = 7

    def submit(i: int) -> None:
        seq, row = lanes[i].claim(1, owner, 1.0)
        lanes[i].commit(seq, row, 1, owner)

    def run(count: int) -> str:
        order = ""
        for _ in range(count):
            rc = k.next_batch(lanes, bell, 0.0, 1, 1.0, 0.01, 100, 0.0, sched)
            assert isinstance(rc, tuple), rc
            i, seq, _, _ = rc
            lanes[i].complete(seq)
            lanes[i].release(seq, 0, 1, owner)
            order += "abH"[i]
        return order

    for _ in range(6):
        submit(0)
        submit(1)
    for _ in range(3):
        submit(2)
    order = run(15)
    assert order[:3] == "HHH", order
    assert order[3:12].count("b") == 6 and order[3:12].count("a") == 3, order
    # class a alone for a while: b, idle meanwhile, may not then monopolise the worker
    for _ in range(10):
        submit(0)
    assert run(10) == "a" * 10
    for _ in range(4):
        submit(0)
        submit(1)
    order = run(8)
    assert order[:3].count("a") >= 1, order


def test_models_sharing_a_cpu_get_time_by_weight(sched_server: ServerProcess) -> None:
    """kernelport.model_weight 110 (nice 10) against the default 1024, both confined to CPU 0 by
    kernelport.cpus: while both are flooded, the heavy model runs several times as often."""
    with Client(sched_server.socket_path) as c:
        workers = {m: s["workers"] for m, s in c.server_status().items()}
    for model, nice in (("share_heavy", 0), ("share_light", 10)):
        (pid,) = workers[model]
        assert os.sched_getaffinity(pid) == {0}
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[16]) == nice  # field 19: nice

    stop = threading.Event()
    errors: list[BaseException] = []

    def loop(model: str) -> None:
        try:
            with Client(sched_server.socket_path) as c:
                while not stop.is_set():
                    c.infer(model, {"x": X})
        except BaseException as e:  # surfaced below
            errors.append(e)

    g = grpcclient.InferenceServerClient(f"127.0.0.1:{sched_server.grpc_port}")

    def executions(model: str) -> int:
        return int(g.get_inference_statistics(model).model_stats[0].execution_count)

    threads = [threading.Thread(target=loop, args=(m,)) for m in ("share_heavy", "share_light") for _ in range(3)]
    for t in threads:
        t.start()
    try:
        threading.Event().wait(1.0)  # both busy before counting
        before = {m: executions(m) for m in ("share_heavy", "share_light")}
        deadline = 300
        while deadline and executions("share_heavy") - before["share_heavy"] < 400:
            deadline -= 1
            threading.Event().wait(0.1)
        after = {m: executions(m) for m in ("share_heavy", "share_light")}
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    heavy = after["share_heavy"] - before["share_heavy"]
    light = after["share_light"] - before["share_light"]
    # the kernel's weights are 1024 : 110; equal shares would give 1 : 1
    assert heavy >= 3 * max(1, light), f"heavy {heavy} runs, light {light}"


def test_a_new_lane_waits_for_its_workers_without_holding_up_the_others(sched_server: ServerProcess) -> None:
    """A new tenant's first request maps a lane in every worker, and one worker is held (by an
    uncommitted blocker): that request waits, but requests in the lanes that exist go on (over gRPC,
    which looks its lane up on every request) through the other instance meanwhile."""
    model = "ticket_pair"
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{sched_server.grpc_port}")
    inp = grpcclient.InferInput("x", [1, 1], "FP32")
    inp.set_data_from_numpy(X)
    g.infer(model, [inp])  # the default lane exists
    with Client(sched_server.socket_path) as c:
        blocker = c.request(model, batch=1)
        blocker.inputs["x"][:] = 0
        for _ in range(200):
            if blocker.taken:
                break
            threading.Event().wait(0.05)
        assert blocker.taken
        done = threading.Event()
        failure: list[BaseException] = []

        def new_tenant() -> None:
            try:
                with Client(sched_server.socket_path, tenant="newcomer") as c2:
                    c2.infer(model, {"x": X})
            except BaseException as e:  # surfaced below
                failure.append(e)
            done.set()

        t = threading.Thread(target=new_tenant)
        t.start()
        for _ in range(5):  # each answered by the free instance while the new lane still waits
            g.infer(model, [inp])
        assert not done.is_set(), "the new lane was mapped while a worker was held"
        blocker.run()
        blocker.release()
        t.join(60)
    assert done.is_set() and not failure, failure


def test_a_level_with_its_own_queue_policy_has_its_own_queue(sched_server: ServerProcess) -> None:
    model = "ticket_levels"
    with Client(sched_server.socket_path) as c:
        for p in (1, 2):  # map both levels' lanes while the worker is free
            c.infer(model, {"x": X}, priority=p)
        blocker = c.request(model, batch=1, priority=2)
        blocker.inputs["x"][:] = 0
        for _ in range(200):
            if blocker.taken:
                break
            threading.Event().wait(0.05)
        assert blocker.taken  # taken: it no longer holds a queue place
        high = [c.request(model, batch=1, priority=1) for _ in range(2)]
        with pytest.raises(QueueFullError):
            c.request(model, batch=1, priority=1)
        low = [c.request(model, batch=1, priority=2) for _ in range(3)]  # the model's queue is separate
        with pytest.raises(QueueFullError):
            c.request(model, batch=1, priority=0)  # priority 0: the default level, whose queue is full
        high[0].release()  # a request that leaves before it is taken gives its place back
        high.append(c.request(model, batch=1, priority=1))
        for r in high[1:] + low:
            r.inputs["x"][:] = 0
            r.submit()
        blocker.run()
        blocker.release()
        tickets = [int(r.run()["OUTPUT__0"][0, 0]) for r in high[1:] + low]
        for r in high[1:] + low:
            r.release()
    assert max(tickets[:2]) < min(tickets[2:])  # and level 1 ran first


# ---- tenants bound to bearer tokens -----------------------------------------------------------------

GOLD_TOKEN = "gold-t0ken-123"
OPEN_TOKEN = "open-t0ken-456"


@pytest.fixture(scope="module")
def token_server(example_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    import shutil

    d = tmp_path_factory.mktemp("tenant_tokens")
    repo = d / "repo"
    shutil.copytree(os.path.join(example_repo, "add_sub"), repo / "add_sub")
    tokens = d / "tokens"
    tokens.write_text(f"infer:{GOLD_TOKEN} tenant=gold\ninfer:{OPEN_TOKEN}\n")
    os.chmod(tokens, 0o600)
    srv = ServerProcess.with_ports(str(repo), str(d / "kp.sock"), "--grpc-token-file", str(tokens),
                                   "--http-token-file", str(tokens), grpc=True, http=True)
    yield srv
    assert srv.stop() == 0, srv.log()


def _add_sub_inputs(module: Any) -> list[Any]:
    """add_sub's two inputs (ones, [1, 16]) for tritonclient.grpc or tritonclient.http."""
    inputs = []
    for n in ("INPUT0", "INPUT1"):
        t = module.InferInput(n, [1, 16], "FP32")
        t.set_data_from_numpy(np.ones((1, 16), np.float32))
        inputs.append(t)
    return inputs


def test_a_token_bound_to_a_tenant_decides_the_tenant(token_server: ServerProcess) -> None:
    from tritonclient.utils import InferenceServerException

    g = grpcclient.InferenceServerClient(f"127.0.0.1:{token_server.grpc_port}")
    inputs = _add_sub_inputs(grpcclient)

    def call(token: str, tenant: str | None = None) -> None:
        headers = {"authorization": f"Bearer {token}"}
        if tenant is not None:
            headers["kernelport-tenant"] = tenant
        g.infer("add_sub", inputs, headers=headers)

    call(GOLD_TOKEN)  # no header: runs as gold
    call(GOLD_TOKEN, "gold")
    with pytest.raises(InferenceServerException) as e:
        call(GOLD_TOKEN, "silver")  # a gold token cannot act as silver
    assert "PERMISSION_DENIED" in str(e.value.status()) and GOLD_TOKEN not in str(e.value)
    call(OPEN_TOKEN, "silver")  # an unbound token: the header decides
    call(OPEN_TOKEN)

    h = httpclient.InferenceServerClient(f"127.0.0.1:{token_server.http_port}")
    hin = _add_sub_inputs(httpclient)
    h.infer("add_sub", hin, headers={"Authorization": f"Bearer {GOLD_TOKEN}"})
    with pytest.raises(InferenceServerException, match="bound to another tenant"):
        h.infer("add_sub", hin, headers={"Authorization": f"Bearer {GOLD_TOKEN}", "kernelport-tenant": "silver"})
    with Client(token_server.socket_path) as c:
        counts = c.tenant_counters("add_sub")
    assert counts["gold"]["claims"] == 3
    assert counts["silver"]["claims"] == 1
    assert counts[""]["claims"] == 1


@pytest.mark.parametrize("line", [
    "infer:tok tenant=", "infer:tok tenant=bad name", "infer:tok owner=x", "infer:tok tenant=a tenant=b",
    "infer:tok tenant=a\ninfer:tok tenant=b",
])
def test_token_file_tenant_errors(line: str) -> None:
    from kernelport.errors import ConfigError
    from kernelport.protocol.auth import TokenTable

    with pytest.raises(ConfigError, match="line"):
        TokenTable.from_lines(line.split("\n"))
