"""Test certificates made with the `openssl` command in a directory: a CA, a server certificate for
127.0.0.1 / localhost, a client certificate, and a second ("rogue") CA with its own client certificate."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class Certs:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_ca: str
    rogue_client_cert: str
    rogue_client_key: str


def _openssl(*args: str, cwd: str) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: str, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN=kernelport test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _make_leaf(d: str, name: str, ca: str, extensions: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


def make_certs(d: str) -> Certs:
    """Every certificate and key of `Certs`, written into directory `d`."""
    _make_ca(d, "ca")
    _make_ca(d, "rogue_ca")
    _make_leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _make_leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _make_leaf(d, "rogue_client", "rogue_ca", "extendedKeyUsage=clientAuth\n")
    p = lambda name: os.path.join(d, name)  # noqa: E731
    return Certs(
        ca=p("ca.crt"), server_cert=p("server.crt"), server_key=p("server.key"),
        client_cert=p("client.crt"), client_key=p("client.key"), rogue_ca=p("rogue_ca.crt"),
        rogue_client_cert=p("rogue_client.crt"), rogue_client_key=p("rogue_client.key"),
    )  # fmt: skip
