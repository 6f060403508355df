"""Security of the HTTP front end: HTTPS, mutual TLS and bearer tokens per API group, as the gRPC front end
has them (`kernelport.protocol.auth`).

Real `kernelport serve` subprocesses over add_sub; certificates made with `openssl` in a fixture
(`tests/_certs.py`); clients are `tritonclient.http` (gevent's TLS) and the stdlib's `http.client` (to see
status codes and headers exactly).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _certs import OPENSSL, Certs, make_certs
from conftest import ServerProcess

pytestmark = pytest.mark.timeout(120)

INFER_TOKEN = "http-infer-token-Q4v"
REPO_TOKEN = "http-repo-token-8Hs"
STAR_TOKEN = "http-star-token-Mm2"
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if OPENSSL is None:
        pytest.skip("the openssl command is not installed")
    return make_certs(str(tmp_path_factory.mktemp("http_certs")))


@pytest.fixture(scope="module")
def add_sub_repo(example_repo: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    repo = str(tmp_path_factory.mktemp("http_sec_repo"))
    shutil.copytree(os.path.join(example_repo, "add_sub"), os.path.join(repo, "add_sub"))
    return repo


def _token_file(d: str, text: str) -> str:
    path = os.path.join(d, "tokens")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def _stop(server: ServerProcess) -> None:
    assert server.stop() == 0, server.log()
    log = server.log()
    for secret in (INFER_TOKEN, REPO_TOKEN, STAR_TOKEN):
        assert secret not in log, "a token reached the server log"


@pytest.fixture(scope="module")
def tls_server(add_sub_repo: str, certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """HTTPS, tokens for `infer` and `repository`; the other groups open."""
    d = str(tmp_path_factory.mktemp("http_tls"))
    tokens = _token_file(d, f"# inference\ninfer:{INFER_TOKEN}\nrepository:{REPO_TOKEN}\n")
    server = ServerProcess.with_ports(
        add_sub_repo, os.path.join(d, "kp.sock"), "--http-tls-cert", certs.server_cert, "--http-tls-key",
        certs.server_key, "--http-token-file", tokens, http=True)
    yield server
    _stop(server)


@pytest.fixture(scope="module")
def mtls_server(add_sub_repo: str, certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Mutual TLS and one token for every path (`*`)."""
    d = str(tmp_path_factory.mktemp("http_mtls"))
    tokens = _token_file(d, f"*:{STAR_TOKEN}\n")
    server = ServerProcess.with_ports(
        add_sub_repo, os.path.join(d, "kp.sock"), "--http-tls-cert", certs.server_cert, "--http-tls-key",
        certs.server_key, "--http-tls-client-ca", certs.ca, "--http-token-file", tokens, http=True)
    yield server
    _stop(server)


def _context(ca: str | None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def _request(server: ServerProcess, method: str, path: str, ctx: ssl.SSLContext, body: bytes | None = None,
             token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", server.http_port, context=ctx, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _infer_body(a: np.ndarray, b: np.ndarray) -> bytes:
    return json.dumps({"inputs": [
        {"name": "INPUT0", "shape": list(a.shape), "datatype": "FP32", "data": a.reshape(-1).tolist()},
        {"name": "INPUT1", "shape": list(b.shape), "datatype": "FP32", "data": b.reshape(-1).tolist()},
    ]}).encode()


def _triton_client(server: ServerProcess, ca: str) -> Any:
    import gevent.ssl

    return httpclient.InferenceServerClient(
        f"127.0.0.1:{server.http_port}", ssl=True,
        ssl_context_factory=lambda *_, **__: gevent.ssl.create_default_context(cafile=ca))


def _add_sub_inputs(seed: int) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((2, 16), dtype=np.float32)
    b = rng.standard_normal((2, 16), dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", [2, 16], "FP32"), httpclient.InferInput("INPUT1", [2, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return a, b, inputs


# ------------------------------------------------------------------------------------------------------
# HTTPS and tokens


def test_tritonclient_http_over_tls_with_token(tls_server: ServerProcess, certs: Certs) -> None:
    c = _triton_client(tls_server, certs.ca)
    try:
        assert c.is_server_ready()  # health is open here
        a, b, inputs = _add_sub_inputs(1)
        result = c.infer("add_sub", inputs, headers={"Authorization": f"Bearer {INFER_TOKEN}"})
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
        np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
        with pytest.raises(InferenceServerException, match="bearer token"):
            c.infer("add_sub", inputs)
    finally:
        c.close()


def test_token_per_group_and_401(tls_server: ServerProcess, certs: Certs) -> None:
    ctx = _context(certs.ca)
    body = _infer_body(np.ones((1, 16), np.float32), np.ones((1, 16), np.float32))
    infer = "/v2/models/add_sub/infer"
    status, headers, data = _request(tls_server, "POST", infer, ctx, body)
    assert status == 401 and headers["content-type"] == "application/json"
    assert headers["www-authenticate"].startswith("Bearer")
    message = json.loads(data)["error"]
    assert "'infer'" in message and "Authorization: Bearer" in message
    for wrong in ("not-the-token", REPO_TOKEN):  # a token of another group does not open `infer`
        status, _, data = _request(tls_server, "POST", infer, ctx, body, token=wrong)
        assert status == 401 and "not valid for API group 'infer'" in json.loads(data)["error"]
        assert wrong not in data.decode()
    status, _, data = _request(tls_server, "POST", infer, ctx, body, token=INFER_TOKEN)
    assert status == 200 and json.loads(data)["outputs"][0]["data"] == [2.0] * 16
    # metadata and health are not listed in the token file: open
    status, _, data = _request(tls_server, "GET", "/v2/models/add_sub", ctx)
    assert status == 200 and json.loads(data)["name"] == "add_sub"
    assert _request(tls_server, "GET", "/v2/health/ready", ctx)[0] == 200
    # repository: its own token only
    load = "/v2/repository/models/add_sub/load"
    assert _request(tls_server, "POST", load, ctx, b"{}", token=INFER_TOKEN)[0] == 401
    assert _request(tls_server, "POST", load, ctx, b"{}", token=REPO_TOKEN)[0] == 200


def test_tls_refuses_plaintext_and_untrusting_clients(tls_server: ServerProcess, certs: Certs) -> None:
    plain = http.client.HTTPConnection("127.0.0.1", tls_server.http_port, timeout=30)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("GET", "/v2/health/live")
        plain.getresponse()
    plain.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        _request(tls_server, "GET", "/v2/health/live", _context(certs.rogue_ca))
    # the server goes on serving after both
    assert _request(tls_server, "GET", "/v2/health/live", _context(certs.ca))[0] == 200


def test_bench_over_https_with_token(tls_server: ServerProcess, certs: Certs) -> None:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-m", "kernelport.cli.main", "bench", "-m", "add_sub", "--http",
            f"127.0.0.1:{tls_server.http_port}", "--tls-ca", certs.ca, "-n", "40", "--warmup", "2", "--json", "-"]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    # no token: the metadata is open, every inference is refused and counted by kind
    assert r.returncode == 1, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["count"] == 0 and result["errors"] == {"InferenceServerException[401]": 40}
    assert "errors: InferenceServerException[401]: 40" in r.stderr
    r = subprocess.run(args + ["--token", INFER_TOKEN], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["count"] == 40 and result["server"]["success"] == 40


# ------------------------------------------------------------------------------------------------------
# mutual TLS


def test_mtls_needs_a_trusted_client_certificate(mtls_server: ServerProcess, certs: Certs) -> None:
    good = _context(certs.ca, certs.client_cert, certs.client_key)
    status, _, _ = _request(mtls_server, "GET", "/v2/health/ready", good, token=STAR_TOKEN)
    assert status == 200
    for ctx in (_context(certs.ca), _context(certs.ca, certs.rogue_client_cert, certs.rogue_client_key)):
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            _request(mtls_server, "GET", "/v2/health/ready", ctx, token=STAR_TOKEN)


def test_star_token_covers_every_path(mtls_server: ServerProcess, certs: Certs) -> None:
    ctx = _context(certs.ca, certs.client_cert, certs.client_key)
    for method, path in (("GET", "/v2/health/live"), ("GET", "/metrics"), ("GET", "/v2"),
                         ("GET", "/v2/models/add_sub/config"), ("POST", "/v2/repository/index"),
                         ("GET", "/no/such/path")):
        status, _, data = _request(mtls_server, method, path, ctx, b"" if method == "POST" else None)
        assert status == 401, (path, data)
        status, _, _ = _request(mtls_server, method, path, ctx, b"" if method == "POST" else None, token=STAR_TOKEN)
        assert status == (404 if path == "/no/such/path" else 200), path


# ------------------------------------------------------------------------------------------------------
# flags


def _serve_fails(repo: str, sock: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "kernelport.cli.main", "serve", "--model-repository", repo,
                        "--socket", sock, *args], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    return r.stderr


def test_bad_http_security_flags_exit_2(add_sub_repo: str, certs: Certs, tmp_path: os.PathLike[str]) -> None:
    sock = os.path.join(tmp_path, "kp.sock")
    assert "--http-port" in _serve_fails(add_sub_repo, sock, "--http-tls-cert", certs.server_cert)
    err = _serve_fails(add_sub_repo, sock, "--http-port", "0", "--http-tls-cert", certs.server_cert)
    assert "--http-tls-key" in err
    err = _serve_fails(add_sub_repo, sock, "--http-port", "0", "--http-tls-cert", certs.server_cert,
                       "--http-tls-key", certs.client_key)
    assert "do not make a usable pair" in err
    bad = os.path.join(tmp_path, "tokens")
    with open(bad, "w") as f:
        f.write("nogroup-token\n")
    assert "line 1" in _serve_fails(add_sub_repo, sock, "--http-port", "0", "--http-token-file", bad)
