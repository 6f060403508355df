"""Security of the gRPC front end: TLS, mutual TLS, bearer tokens per API group, model names that try to
leave the repository, and error messages that must never name a server path or a segment.

Every server here is a real `kernelport serve` subprocess over a small repository (add_sub plus two models
that fail to load); clients are `tritonclient` and its generated stub. Certificates are made with the
`openssl` command in a temp dir: a CA, a server certificate for 127.0.0.1, a client certificate, and a
second ("rogue") CA with its own client certificate.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from _certs import OPENSSL, Certs, make_certs
from conftest import ServerProcess, free_port
from kernelport.errors import ConfigError
from kernelport.protocol.auth import GROUPS, METHOD_GROUPS, TokenTable

pytestmark = pytest.mark.timeout(90)

needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")

STAR_TOKEN = "star-token-Zq81x"
INFER_TOKENS = ("infer-token-A7k2", "infer-token-second-B9")
REPO_TOKEN = "repo-token-Pp3e"
SHM_TOKEN = "shm-token-Lw0s"
HEALTH = "/grpc.health.v1.Health/Check"


# ------------------------------------------------------------------------------------------------------
# certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if OPENSSL is None:
        pytest.skip("the openssl command is not installed")
    return make_certs(str(tmp_path_factory.mktemp("certs")))


# ------------------------------------------------------------------------------------------------------
# the repository and the servers


@pytest.fixture(scope="module")
def sec_repo(example_repo: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """add_sub, plus `broken_config` (an unparsable config.pbtxt) and `corrupt_onnx` (a model file that is
    not ONNX), which fail to load; beside the repository, `outside/evil`: a valid model that no name may reach.
    """
    base = tmp_path_factory.mktemp("sec")
    repo = str(base / "sec_repo")
    shutil.copytree(os.path.join(example_repo, "add_sub"), os.path.join(repo, "add_sub"))
    os.makedirs(os.path.join(repo, "broken_config", "1"))
    with open(os.path.join(repo, "broken_config", "config.pbtxt"), "w") as f:
        f.write('name: "broken_config"\nmax_batch_size: {{ not pbtxt\n')
    os.makedirs(os.path.join(repo, "corrupt_onnx", "1"))
    with open(os.path.join(example_repo, "add_sub", "config.pbtxt")) as f:
        config = f.read().replace('name: "add_sub"', 'name: "corrupt_onnx"')
    with open(os.path.join(repo, "corrupt_onnx", "config.pbtxt"), "w") as f:
        f.write(config)
    with open(os.path.join(repo, "corrupt_onnx", "1", "model.onnx"), "wb") as f:
        f.write(b"this is not an onnx model\x00\x01\x02")
    shutil.copytree(os.path.join(example_repo, "add_sub"), str(base / "outside" / "evil"))
    with open(str(base / "outside" / "evil" / "config.pbtxt")) as f:
        evil = f.read().replace('name: "add_sub"', 'name: "evil"')
    with open(str(base / "outside" / "evil" / "config.pbtxt"), "w") as f:
        f.write(evil)
    return repo




@dataclass
class Served:
    process: ServerProcess
    url: str
    repo: str

    @property
    def socket_path(self) -> str:
        return self.process.socket_path


def _start(repo: str, sock: str, *extra: str) -> Served:
    # A port found free may be taken before the server binds it: try again on another.
    for attempt in range(3):
        port = free_port()
        try:
            proc = ServerProcess(repo, sock, "--grpc-port", str(port), "--max-restarts", "100", *extra)
        except RuntimeError as e:
            if "cannot listen" in str(e) and attempt < 2:
                continue
            raise
        return Served(proc, f"127.0.0.1:{port}", repo)
    raise AssertionError("unreachable")


def _stop(server: Served) -> None:
    code = server.process.stop()
    log = server.process.log()
    assert code == 0, log
    for secret in (STAR_TOKEN, REPO_TOKEN, SHM_TOKEN, *INFER_TOKENS):
        assert secret not in log, "a token reached the server log"


def _write_token_file(d: str, text: str) -> str:
    path = os.path.join(d, "tokens")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


@pytest.fixture(scope="module")
def tls_server(sec_repo: str, certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Server TLS only: any client that trusts the CA may connect."""
    sock = str(tmp_path_factory.mktemp("tls_sock") / "kp.sock")
    server = _start(sec_repo, sock, "--grpc-tls-cert", certs.server_cert, "--grpc-tls-key", certs.server_key)
    yield server
    _stop(server)


@pytest.fixture(scope="module")
def mtls_server(sec_repo: str, certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Mutual TLS (client certificates signed by the CA) and one token for every RPC (`*`)."""
    d = tmp_path_factory.mktemp("mtls")
    tokens = _write_token_file(str(d), f"# every RPC\n*:{STAR_TOKEN}\n")
    server = _start(
        sec_repo, str(d / "kp.sock"),
        "--grpc-tls-cert", certs.server_cert, "--grpc-tls-key", certs.server_key,
        "--grpc-tls-client-ca", certs.ca, "--grpc-token-file", tokens,
    )  # fmt: skip
    yield server
    _stop(server)


@pytest.fixture(scope="module")
def token_server(sec_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Plaintext, tokens for infer (two), repository and shm; metadata and health open."""
    d = tmp_path_factory.mktemp("tokens")
    tokens = _write_token_file(
        str(d),
        f"infer:{INFER_TOKENS[0]}\n\n  infer : {INFER_TOKENS[1]}  \nrepository:{REPO_TOKEN}\nshm:{SHM_TOKEN}\n",
    )
    server = _start(sec_repo, str(d / "kp.sock"), "--grpc-token-file", tokens, "--allow-client-shm")
    yield server
    _stop(server)


@pytest.fixture(scope="module")
def plain_server(sec_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Plaintext, no tokens, client shared memory allowed."""
    sock = str(tmp_path_factory.mktemp("plain_sock") / "kp.sock")
    server = _start(sec_repo, sock, "--allow-client-shm")
    yield server
    _stop(server)


# ------------------------------------------------------------------------------------------------------
# helpers


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _add_sub_inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[grpcclient.InferInput]]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((2, 16)).astype(np.float32)
    b = rng.standard_normal((2, 16)).astype(np.float32)
    inputs = []
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        x = grpcclient.InferInput(name, list(arr.shape), "FP32")
        x.set_data_from_numpy(arr)
        inputs.append(x)
    return a, b, inputs


def _check_add_sub(client: grpcclient.InferenceServerClient, headers: dict[str, str] | None = None) -> None:
    a, b, inputs = _add_sub_inputs()
    result = client.infer("add_sub", inputs, headers=headers, client_timeout=30)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)


def _error(fn: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn()
    return info.value


def _code(err: InferenceServerException) -> str:
    return str(err.status()).removeprefix("StatusCode.")


def _raw_infer_request() -> service_pb2.ModelInferRequest:
    a, b, _ = _add_sub_inputs()
    req = service_pb2.ModelInferRequest(model_name="add_sub", id="r")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="FP32", shape=[2, 16])
    req.raw_input_contents.extend([a.tobytes(), b.tobytes()])
    return req


def _health_check(channel: grpc.Channel, metadata: list[tuple[str, str]] | None = None) -> bytes:
    """grpc.health.v1 Check of the health service itself (SERVING while live; the broken models in the
    repository make the server, hence the service "", not ready). Wire bytes: field 1, a string."""
    service = b"grpc.health.v1.Health"
    check = channel.unary_unary(
        HEALTH, request_serializer=lambda _: b"\x0a" + bytes([len(service)]) + service,
        response_deserializer=lambda b: b,
    )  # fmt: skip
    return bytes(check(None, metadata=metadata, timeout=10))


# ------------------------------------------------------------------------------------------------------
# the token file (no server)


def test_token_file_parses_groups_comments_and_repeats() -> None:
    table = TokenTable.from_lines(
        ["# a comment", "", "infer:aaa", "  infer :  bbb  ", "shm:ccc", "health:ddd:with:colons"]
    )
    assert dict(table.tokens) == {"infer": (b"aaa", b"bbb"), "shm": (b"ccc",), "health": (b"ddd:with:colons",)}
    assert table.protected_groups == ("infer", "shm", "health")
    assert TokenTable.from_lines(["*:x"]).protected_groups == GROUPS
    # Every RPC of the service is in exactly one group (the mapping is what the docstring documents).
    assert set(METHOD_GROUPS.values()) == set(GROUPS)
    assert table.required("/inference.GRPCInferenceService/ModelInfer") == ("infer", (b"aaa", b"bbb"))
    assert table.required("/inference.GRPCInferenceService/ModelMetadata") is None
    assert TokenTable.matches(b"bbb", (b"aaa", b"bbb"))
    assert not TokenTable.matches(b"bb", (b"aaa", b"bbb"))


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("infer", "expected 'group:token'"),
        ("inference:sekrit-value", "unknown group"),
        ("infer:", "printable ASCII"),
        ("infer:two words-sekrit-value", "printable ASCII"),
        ("infer:caf\u00e9-sekrit-value", "printable ASCII"),
    ],
)
def test_token_file_errors_name_the_line_not_the_token(line: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        TokenTable.from_lines(["# header", line], "tokens.txt")
    message = str(info.value)
    assert "tokens.txt line 2" in message and fragment in message, message
    assert "sekrit" not in message, message


def test_token_file_with_no_token_is_refused() -> None:
    with pytest.raises(ConfigError, match="no 'group:token' line"):
        TokenTable.from_lines(["# nothing", ""])


# ------------------------------------------------------------------------------------------------------
# startup refuses bad security options, before serving anything


def _serve_fails(repo: str, sock: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "kernelport.cli.main", "serve", "--model-repository", repo, "--socket", sock, *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_startup_refuses_bad_security_options(sec_repo: str, certs: Certs, tmp_path: Any) -> None:
    sock = str(tmp_path / "kp.sock")
    port = ["--grpc-port", str(free_port())]
    err = _serve_fails(sec_repo, sock, *port, "--grpc-tls-cert", certs.server_cert)
    assert "certificate and its private key" in err
    err = _serve_fails(sec_repo, sock, *port, "--grpc-tls-cert", certs.server_cert, "--grpc-tls-key", certs.client_key)
    assert "do not make a usable pair" in err
    garbage = str(tmp_path / "garbage.pem")
    with open(garbage, "w") as f:
        f.write("not a certificate\n")
    err = _serve_fails(sec_repo, sock, *port, "--grpc-tls-cert", garbage, "--grpc-tls-key", certs.server_key)
    assert "not a PEM file" in err
    err = _serve_fails(
        sec_repo, sock, *port, "--grpc-tls-cert", certs.server_cert, "--grpc-tls-key", certs.server_key,
        "--grpc-tls-client-ca", certs.server_key,
    )  # fmt: skip
    assert "client CA" in err
    bad_tokens = _write_token_file(str(tmp_path), "infer:ok-token\nnosuchgroup:leaky-sekrit\n")
    err = _serve_fails(sec_repo, sock, *port, "--grpc-token-file", bad_tokens)
    assert "line 2" in err and "unknown group" in err and "sekrit" not in err, err
    err = _serve_fails(sec_repo, sock, "--grpc-token-file", bad_tokens)  # no --grpc-port
    assert "need --grpc-port" in err
    assert not os.path.exists(sock)


# ------------------------------------------------------------------------------------------------------
# TLS and mutual TLS


def test_tls_client_works(tls_server: Served, certs: Certs) -> None:
    c = grpcclient.InferenceServerClient(tls_server.url, ssl=True, root_certificates=certs.ca)
    try:
        assert c.is_server_live(client_timeout=10)
        _check_add_sub(c)
    finally:
        c.close()


def test_tls_refuses_plaintext_and_untrusting_clients(tls_server: Served, certs: Certs) -> None:
    plain = grpcclient.InferenceServerClient(tls_server.url)
    try:
        assert _code(_error(lambda: plain.is_server_live(client_timeout=10))) == "UNAVAILABLE"
        assert _code(_error(lambda: _check_add_sub(plain))) == "UNAVAILABLE"
    finally:
        plain.close()
    # A client that trusts another CA refuses the server's certificate.
    wrong = grpcclient.InferenceServerClient(tls_server.url, ssl=True, root_certificates=certs.rogue_ca)
    try:
        assert _code(_error(lambda: wrong.is_server_live(client_timeout=10))) == "UNAVAILABLE"
    finally:
        wrong.close()


def _mtls_client(
    server: Served, certs: Certs, *, cert: str | None, key: str | None
) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        server.url, ssl=True, root_certificates=certs.ca, private_key=key, certificate_chain=cert
    )


def test_mtls_client_with_certificate_and_token_works(mtls_server: Served, certs: Certs) -> None:
    c = _mtls_client(mtls_server, certs, cert=certs.client_cert, key=certs.client_key)
    try:
        assert c.is_server_live(headers=_bearer(STAR_TOKEN), client_timeout=10)
        _check_add_sub(c, _bearer(STAR_TOKEN))
        assert c.get_model_metadata("add_sub", headers=_bearer(STAR_TOKEN)).name == "add_sub"
    finally:
        c.close()


@pytest.mark.parametrize("who", ["no certificate", "certificate of another CA", "plaintext"])
def test_mtls_refuses_clients_without_a_trusted_certificate(mtls_server: Served, certs: Certs, who: str) -> None:
    if who == "plaintext":
        c = grpcclient.InferenceServerClient(mtls_server.url)
    elif who == "no certificate":
        c = _mtls_client(mtls_server, certs, cert=None, key=None)
    else:
        c = _mtls_client(mtls_server, certs, cert=certs.rogue_client_cert, key=certs.rogue_client_key)
    try:
        # The handshake fails before any RPC: even a valid token does not help.
        err = _error(lambda: c.is_server_live(headers=_bearer(STAR_TOKEN), client_timeout=10))
        assert _code(err) == "UNAVAILABLE", err.message()
        assert _code(_error(lambda: _check_add_sub(c, _bearer(STAR_TOKEN)))) == "UNAVAILABLE"
    finally:
        c.close()


def test_star_token_protects_every_rpc(mtls_server: Served, certs: Certs) -> None:
    c = _mtls_client(mtls_server, certs, cert=certs.client_cert, key=certs.client_key)
    try:
        calls: dict[str, Callable[[dict[str, str] | None], Any]] = {
            "ServerLive": lambda h: c.is_server_live(headers=h),
            "ServerReady": lambda h: c.is_server_ready(headers=h),
            "ModelReady": lambda h: c.is_model_ready("add_sub", headers=h),
            "ServerMetadata": lambda h: c.get_server_metadata(headers=h),
            "ModelConfig": lambda h: c.get_model_config("add_sub", headers=h),
            "ModelStatistics": lambda h: c.get_inference_statistics("add_sub", headers=h),
            "RepositoryIndex": lambda h: c.get_model_repository_index(headers=h),
            "RepositoryModelUnload": lambda h: c.unload_model("no_such_model", headers=h),
            "SystemSharedMemoryStatus": lambda h: c.get_system_shared_memory_status(headers=h),
            "ModelInfer": lambda h: _check_add_sub(c, h),
        }
        for rpc, call in calls.items():
            for headers in (None, _bearer("wrong-token"), {"authorization": STAR_TOKEN}):
                err = _error(lambda: call(headers))  # noqa: B023
                assert _code(err) == "UNAUTHENTICATED", (rpc, err.message())
                assert rpc in err.message() and STAR_TOKEN not in err.message(), err.message()
                assert "wrong-token" not in err.message()
        # TraceSetting and LogSettings belong to no group: `*` covers them too.
        err = _error(lambda: c.update_log_settings({"log_verbose_level": 1}))
        assert _code(err) == "UNAUTHENTICATED"
        assert _code(_error(lambda: c.update_log_settings({"log_verbose_level": 1}, headers=_bearer(STAR_TOKEN)))) == (
            "UNIMPLEMENTED"
        )
        assert c.is_server_live(headers=_bearer(STAR_TOKEN))
        assert c.is_model_ready("add_sub", headers=_bearer(STAR_TOKEN))
    finally:
        c.close()
    # grpc.health.v1 over the same mutual TLS channel.
    with open(certs.ca, "rb") as f1, open(certs.client_key, "rb") as f2, open(certs.client_cert, "rb") as f3:
        creds = grpc.ssl_channel_credentials(f1.read(), f2.read(), f3.read())
    with grpc.secure_channel(mtls_server.url, creds) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _health_check(channel)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _health_check(channel, [("authorization", f"Bearer {STAR_TOKEN}")]) == b"\x08\x01"


# ------------------------------------------------------------------------------------------------------
# tokens per group


def test_token_groups(token_server: Served) -> None:
    c = grpcclient.InferenceServerClient(token_server.url)
    try:
        # Open groups: metadata and health, with or without a token.
        assert c.is_server_live()
        assert not c.is_server_ready()  # broken_config and corrupt_onnx are not ready: open, and answered
        assert c.is_model_ready("add_sub")
        assert c.get_model_metadata("add_sub").name == "add_sub"
        assert c.get_model_config("add_sub").config.name == "add_sub"
        assert any(m.name == "add_sub" for m in c.get_model_repository_index().models)
        assert c.is_server_live(headers=_bearer("anything"))

        # infer: either of its two tokens; not another group's token, nor none, nor a wrong one.
        for token in INFER_TOKENS:
            _check_add_sub(c, _bearer(token))
        _check_add_sub(c, {"authorization": f"bearer {INFER_TOKENS[0]}"})  # the scheme is case-insensitive
        for headers, why in (
            (None, "no 'authorization' metadata"),
            ({"authorization": INFER_TOKENS[0]}, "not 'Bearer <token>'"),
            ({"authorization": "Bearer "}, "empty or malformed"),
            (_bearer(INFER_TOKENS[0] + "x"), "not valid"),
            (_bearer(INFER_TOKENS[0][:-1]), "not valid"),
            (_bearer(REPO_TOKEN), "not valid"),
            (_bearer(SHM_TOKEN), "not valid"),
        ):
            err = _error(lambda: _check_add_sub(c, headers))  # noqa: B023
            assert _code(err) == "UNAUTHENTICATED", err.message()
            message = err.message()
            assert why in message and "'infer'" in message, message
            for secret in (*INFER_TOKENS, REPO_TOKEN, SHM_TOKEN):
                assert secret[:-1] not in message, message

        # repository: load/unload need its token; metadata stays open meanwhile.
        err = _error(lambda: c.load_model("add_sub", headers=_bearer(INFER_TOKENS[0])))
        assert _code(err) == "UNAUTHENTICATED" and "'repository'" in err.message()
        err = _error(lambda: c.unload_model("add_sub"))
        assert _code(err) == "UNAUTHENTICATED"
        assert c.is_model_ready("add_sub")  # the refused unload did nothing
        err = _error(lambda: c.load_model("no_such_model", headers=_bearer(REPO_TOKEN)))
        assert _code(err) == "NOT_FOUND"  # authenticated: the request reached the repository

        # shm: register/status/unregister need its token.
        key = f"/sec_tok_{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region("sec_tok", key, 256)
        try:
            err = _error(lambda: c.register_system_shared_memory("sec_tok", key, 256))
            assert _code(err) == "UNAUTHENTICATED" and "'shm'" in err.message()
            err = _error(lambda: c.get_system_shared_memory_status())
            assert _code(err) == "UNAUTHENTICATED"
            c.register_system_shared_memory("sec_tok", key, 256, headers=_bearer(SHM_TOKEN))
            status = c.get_system_shared_memory_status(headers=_bearer(SHM_TOKEN))
            assert [r.name for r in status.regions.values()] == ["sec_tok"]
            assert _code(_error(lambda: c.unregister_system_shared_memory("sec_tok"))) == "UNAUTHENTICATED"
            c.unregister_system_shared_memory("sec_tok", headers=_bearer(SHM_TOKEN))
            assert not c.get_system_shared_memory_status(headers=_bearer(SHM_TOKEN)).regions
        finally:
            shm.destroy_shared_memory_region(handle)
    finally:
        c.close()


def test_token_for_streaming_infer(token_server: Served) -> None:
    with grpc.insecure_channel(token_server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ModelStreamInfer(iter([_raw_infer_request()]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "ModelStreamInfer" in (info.value.details() or "")
        md = [("authorization", f"Bearer {INFER_TOKENS[1]}")]
        replies = list(stub.ModelStreamInfer(iter([_raw_infer_request()] * 3), metadata=md, timeout=30))
        assert len(replies) == 3 and all(not r.error_message for r in replies)
        a, b, _ = _add_sub_inputs()
        out0 = np.frombuffer(replies[0].infer_response.raw_output_contents[0], np.float32).reshape(2, 16)
        np.testing.assert_allclose(out0, a + b, rtol=1e-6)
        # Health is open on this server, through grpc.health.v1 too.
        assert _health_check(channel) == b"\x08\x01"


# ------------------------------------------------------------------------------------------------------
# model names that try to leave the repository


TRAVERSAL_NAMES = ["../x", "a/b", "..", ".", "", "/etc/passwd", "../outside/evil", "..\\x", "add_sub\x00",
                   "\x00", "add_sub/../add_sub", ".hidden", "a/../../b"]  # fmt: skip


def _forbidden_fragments(server: Served) -> list[str]:
    repo = server.repo
    fragments = [
        repo, os.path.realpath(repo), os.path.dirname(repo), server.socket_path,
        os.path.dirname(server.socket_path), "/dev/shm", "memfd", "kp-add_sub", "/proc/",
    ]  # fmt: skip
    return [f for f in fragments if f]


def _assert_clean(messages: list[str], server: Served, echoed: tuple[str, ...] = ()) -> None:
    """No message names a server path or segment; `echoed` are the client's own inputs, which a message
    may repeat (a client naming the repository's path learns nothing from seeing it again)."""
    forbidden = _forbidden_fragments(server)
    for message in messages:
        for own in sorted(echoed, key=len, reverse=True):
            if own:
                message = message.replace(repr(own)[1:-1], "").replace(own, "")
        for fragment in forbidden:
            assert fragment not in message, f"error message names {fragment!r}: {message!r}"


def test_repository_names_cannot_traverse(plain_server: Served) -> None:
    c = grpcclient.InferenceServerClient(plain_server.url)
    messages: list[str] = []
    names = [*TRAVERSAL_NAMES, plain_server.repo, os.path.join(plain_server.repo, "add_sub")]
    try:
        for name in names:
            for call in (c.load_model, c.unload_model):
                err = _error(lambda: call(name, client_timeout=30))  # noqa: B023
                assert _code(err) in ("INVALID_ARGUMENT", "NOT_FOUND"), (name, err.message())
                messages.append(err.message())
            assert not c.is_model_ready(name)
        # The model beside the repository was never loaded, and the index lists only the repository's models.
        index = {m.name for m in c.get_model_repository_index().models}
        assert index == {"add_sub", "broken_config", "corrupt_onnx"}, index
        assert c.is_model_ready("add_sub")
        _check_add_sub(c)
    finally:
        c.close()
    _assert_clean(messages, plain_server, echoed=tuple(names))


# ------------------------------------------------------------------------------------------------------
# error messages never name a server path or a segment


def _bad_requests(c: grpcclient.InferenceServerClient, stub: Any, key: str) -> list[str]:
    """Send a battery of bad requests; return every error message (each call must fail)."""
    messages: list[str] = []

    def expect(fn: Callable[[], Any]) -> None:
        messages.append(_error(fn).message())

    def expect_raw(fn: Callable[[], Any]) -> None:
        with pytest.raises(grpc.RpcError) as info:
            fn()
        assert info.value.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), info.value.details()
        messages.append(info.value.details() or "")

    a, b, inputs = _add_sub_inputs()
    # unknown models and versions, everywhere a model is named
    expect(lambda: c.infer("no_such_model", inputs))
    expect(lambda: c.get_model_metadata("no_such_model"))
    expect(lambda: c.get_model_config("no_such_model"))
    expect(lambda: c.get_inference_statistics("no_such_model"))
    expect(lambda: c.unload_model("no_such_model"))
    # loads of missing, unparsable and corrupt models
    expect(lambda: c.load_model("no_such_model"))
    expect(lambda: c.load_model("../no_such_model"))
    expect(lambda: c.load_model("broken_config"))
    # (corrupt_onnx: test_load_error_of_a_corrupt_model_names_no_server_path, below)
    # bad shapes, types and sizes
    bad = grpcclient.InferInput("INPUT0", [2, 15], "FP32")
    bad.set_data_from_numpy(a[:, :15].copy())
    expect(lambda: c.infer("add_sub", [bad, inputs[1]]))
    wrong_type = grpcclient.InferInput("INPUT0", [2, 16], "FP64")
    wrong_type.set_data_from_numpy(a.astype(np.float64))
    expect(lambda: c.infer("add_sub", [wrong_type, inputs[1]]))
    unknown = grpcclient.InferInput("NOPE", [2, 16], "FP32")
    unknown.set_data_from_numpy(a)
    expect(lambda: c.infer("add_sub", [*inputs, unknown]))
    expect(lambda: c.infer("add_sub", inputs[:1]))
    req = _raw_infer_request()
    req.raw_input_contents[0] = b"\x00" * 7
    expect_raw(lambda: stub.ModelInfer(req, timeout=10))
    req = _raw_infer_request()
    req.inputs[0].shape[:] = [2, -16]
    expect_raw(lambda: stub.ModelInfer(req, timeout=10))
    req = _raw_infer_request()
    req.inputs[0].shape[:] = [2**62, 16]
    expect_raw(lambda: stub.ModelInfer(req, timeout=10))
    # bad shared memory: keys, regions, offsets, sizes
    for bad_key in ("/no_such_key_" + uuid.uuid4().hex, "/kernelport-x", "/kp_lane", "/kp-add_sub-lane0",
                    "../../etc/passwd", "/dev/shm/x", "/a/b", "", "/" + "x" * 300, "/."):  # fmt: skip
        expect(lambda: c.register_system_shared_memory("sec_bad", bad_key, 64))  # noqa: B023
    expect(lambda: c.register_system_shared_memory("sec_big", key, 4096 * 1024))
    expect(lambda: c.register_system_shared_memory("sec_off", key, 64, offset=2**63))
    c.register_system_shared_memory("sec_ok", key, 256)
    try:
        expect(lambda: c.register_system_shared_memory("sec_ok", key, 256))  # already registered
        for region, size, offset in (("no_region", 128, 0), ("sec_ok", 128, 256), ("sec_ok", 512, 0),
                                     ("sec_ok", 128, 2**62)):  # fmt: skip
            x0 = grpcclient.InferInput("INPUT0", [2, 16], "FP32")
            x0.set_shared_memory(region, size, offset=offset)
            expect(lambda: c.infer("add_sub", [x0, inputs[1]]))  # noqa: B023
        out = grpcclient.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory("sec_ok", 64)
        expect(lambda: c.infer("add_sub", inputs, outputs=[out]))
        expect(lambda: c.get_system_shared_memory_status("no_region"))
    finally:
        c.unregister_system_shared_memory("sec_ok")
    expect(lambda: c.register_cuda_shared_memory("cuda", b"\x00" * 64, 0, 64))
    return messages


def test_errors_name_no_server_path_or_segment(plain_server: Served) -> None:
    key = f"/sec_leak_{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region("sec_leak", key, 256)
    c = grpcclient.InferenceServerClient(plain_server.url)
    channel = grpc.insecure_channel(plain_server.url)
    try:
        messages = _bad_requests(c, service_pb2_grpc.GRPCInferenceServiceStub(channel), key)
        # The stream reports a failed request in error_message.
        replies = list(
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter([service_pb2.ModelInferRequest(model_name="no_such_model")]), timeout=10
            )
        )
        assert len(replies) == 1 and replies[0].error_message
        messages.append(replies[0].error_message)
        # The repository index says why broken_config is unavailable: in the same words.
        reasons = [m.reason for m in c.get_model_repository_index().models if m.name == "broken_config"]
        assert len(reasons) == 1 and all(reasons), reasons
        messages += reasons
        assert all(messages)
        for m in messages:
            assert key not in m, f"error message names the client's key: {m!r}"
        _assert_clean(messages, plain_server)
        _check_add_sub(c)
    finally:
        channel.close()
        c.close()
        shm.destroy_shared_memory_region(handle)


def test_infer_of_unknown_version_is_not_found(plain_server: Served) -> None:
    c = grpcclient.InferenceServerClient(plain_server.url)
    try:
        _, _, inputs = _add_sub_inputs()
        err = _error(lambda: c.infer("add_sub", inputs, model_version="9"))
        assert _code(err) == "NOT_FOUND", err.message()
    finally:
        c.close()


def test_load_error_of_a_corrupt_model_names_no_server_path(plain_server: Served) -> None:
    c = grpcclient.InferenceServerClient(plain_server.url)
    try:
        err = _error(lambda: c.load_model("corrupt_onnx", client_timeout=60))
        assert _code(err) in ("INVALID_ARGUMENT", "UNAVAILABLE"), err.message()
        reasons = [m.reason for m in c.get_model_repository_index().models if m.name == "corrupt_onnx"]
        assert len(reasons) == 1 and reasons[0], reasons
        _assert_clean([err.message(), *reasons], plain_server)
    finally:
        c.close()
