"""Security of the gRPC and HTTP front ends: TLS credentials and bearer tokens per API group.

TLS (`server_credentials`): a PEM certificate chain and its private key make the front end serve TLS only;
with a client CA bundle as well, it is mutual TLS: a client must present a certificate signed by that CA,
or its handshake fails before any RPC is seen.

Token file (`--grpc-token-file FILE`, `TokenTable.from_file`): one `group:token` per line.

    # comment lines and blank lines are ignored; whitespace around group and token is stripped
    infer:s3cret-for-inference
    repository:another-token
    *:admin-token
    infer:t0ken-of-gold tenant=gold

A token may be bound to a tenant (` tenant=NAME` after it): requests carrying it run as that tenant
(`kernelport.server.scheduling`), and one that names another tenant in its `kernelport-tenant` header is
refused with PERMISSION_DENIED (HTTP 403). Without a binding the tenant is what the request says.

Groups, and the RPCs each one covers:
- `infer`: ModelInfer, ModelStreamInfer.
- `metadata`: ServerMetadata, ModelMetadata, ModelConfig, ModelReady, ModelStatistics, RepositoryIndex.
- `repository`: RepositoryModelLoad, RepositoryModelUnload.
- `shm`: the system and CUDA shared-memory Register / Unregister / Status RPCs.
- `health`: ServerLive, ServerReady and `grpc.health.v1.Health` (Check, Watch).
- `*`: every RPC, the ones above and any other (TraceSetting, LogSettings).

A group with at least one token is protected: each of its RPCs must carry the metadata
`authorization: Bearer <token>` (tritonclient: `headers={"authorization": "Bearer <token>"}`) with a token
listed for that group or for `*`; otherwise it fails with UNAUTHENTICATED before the servicer runs. Groups
with no token (and no `*` line) stay open. Several lines may name the same group: any of its tokens is
accepted. A token is 1 to 4096 printable ASCII characters without spaces (what a gRPC metadata value can
carry). Tokens are compared in constant time (`hmac.compare_digest`) against every token of the group, and
no error message or log line ever contains a token: an error in the file names its line number only.

The HTTP front end uses the same token file format and groups (`--http-token-file`): a request needs the
header `Authorization: Bearer <token>`; `http_group` maps its path to a group (inference to `infer`, model
metadata, config, readiness, statistics, the repository index, server metadata and `/metrics` to
`metadata`, load / unload to `repository`, `/v2/health/*` to `health`); a refused request gets 401 with a
JSON error and `WWW-Authenticate: Bearer`. TLS for HTTP is the stdlib's `ssl` (`server_ssl_context`), with
the same meaning of certificate, key and client CA.

The file should be readable by the server's user only; a file that others can read is served, with a
warning in the log.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from kernelport.errors import ConfigError, KernelPortError, PermissionDeniedError

__all__ = [
    "ALL_GROUPS",
    "GROUPS",
    "METHOD_GROUPS",
    "BearerTokenInterceptor",
    "TokenTable",
    "bearer_token",
    "request_tenant",
    "http_group",
    "method_group",
    "read_tls_files",
    "server_credentials",
    "server_ssl_context",
]

log = logging.getLogger(__name__)

GROUPS: tuple[str, ...] = ("infer", "metadata", "repository", "shm", "health")
ALL_GROUPS = "*"
MAX_TOKEN_CHARS = 4096
_BEARER = "bearer"

_INFERENCE = "/inference.GRPCInferenceService/"
_HEALTH = "/grpc.health.v1.Health/"

# Full gRPC method path -> group. A method not listed here is covered only by a `*` token.
METHOD_GROUPS: Mapping[str, str] = {
    **{_INFERENCE + m: "infer" for m in ("ModelInfer", "ModelStreamInfer")},
    **{
        _INFERENCE + m: "metadata"
        for m in (
            "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelReady", "ModelStatistics", "RepositoryIndex",
        )
    },
    **{_INFERENCE + m: "repository" for m in ("RepositoryModelLoad", "RepositoryModelUnload")},
    **{
        _INFERENCE + f"{kind}SharedMemory{op}": "shm"
        for kind in ("System", "Cuda")
        for op in ("Register", "Unregister", "Status")
    },
    **{_INFERENCE + m: "health" for m in ("ServerLive", "ServerReady")},
    **{_HEALTH + m: "health" for m in ("Check", "Watch")},
}  # fmt: skip


def method_group(method: str) -> str | None:
    """The group of a full method path ("/inference.GRPCInferenceService/ModelInfer" -> "infer")."""
    return METHOD_GROUPS.get(method)


def http_group(path: str) -> str | None:
    """The group of an HTTP request path (KServe v2 REST, `kernelport.protocol.http_frontend`), or None for
    a path of no group (covered by a `*` token only)."""
    segs = [x for x in path.split("?", 1)[0].split("/") if x]
    if segs == ["metrics"]:
        return "metadata"
    if not segs or segs[0] != "v2":
        return None
    rest = segs[1:]
    if not rest:
        return "metadata"  # server metadata
    if rest[0] == "health":
        return "health"
    if rest[0] == "models":
        return "infer" if rest[-1] == "infer" and len(rest) >= 3 else "metadata"
    if rest[0] == "repository":
        return "repository" if rest[-1] in ("load", "unload") and len(rest) >= 4 else "metadata"
    if rest[0] in ("systemsharedmemory", "cudasharedmemory"):
        return "shm"
    return None


def _valid_token(token: str) -> bool:
    return 0 < len(token) <= MAX_TOKEN_CHARS and all("!" <= c <= "~" for c in token)


# ------------------------------------------------------------------------------------------------------
# tokens


@dataclass(frozen=True)
class TokenTable:
    """The tokens of each group (`*` for every RPC), as bytes for `hmac.compare_digest`."""

    tokens: Mapping[str, tuple[bytes, ...]]
    tenants: Mapping[bytes, str] = field(default_factory=dict)  # token -> the tenant it is bound to

    @classmethod
    def from_lines(cls, lines: Iterable[str], source: str = "token file") -> TokenTable:
        """Parse `group:token [tenant=NAME]` lines; ConfigError names `source` and the line, never the token."""
        from kernelport.server.scheduling import check_tenant

        table: dict[str, list[bytes]] = {}
        tenants: dict[bytes, str] = {}
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            group, sep, token = line.partition(":")
            group, token = group.strip(), token.strip()
            where = f"{source} line {number}"
            token, _, extra = token.partition(" ")
            bound = None
            for item in extra.split():
                key, eq, value = item.partition("=")
                if key != "tenant" or not eq:  # not a binding: a token with a space in it
                    raise ConfigError(
                        f"{where}: the token must be 1 to {MAX_TOKEN_CHARS} printable ASCII characters "
                        "without spaces (only ' tenant=NAME' may follow it)")
                if bound is not None:
                    raise ConfigError(f"{where}: a token is bound to one tenant at most")
                try:
                    bound = check_tenant(value, "token file")
                except KernelPortError:
                    raise ConfigError(
                        f"{where}: the tenant name is not valid (1-64 of letters, digits, ._:@-)") from None
                if not bound:
                    raise ConfigError(f"{where}: 'tenant=' needs a name")
            if not sep:
                raise ConfigError(f"{where}: expected 'group:token'")
            if group != ALL_GROUPS and group not in GROUPS:
                raise ConfigError(
                    f"{where}: unknown group '{group[:32]}' (groups: {', '.join(GROUPS)}, or '*' for all)"
                )
            if not _valid_token(token):
                raise ConfigError(
                    f"{where}: the token must be 1 to {MAX_TOKEN_CHARS} printable ASCII characters "
                    "without spaces"
                )
            table.setdefault(group, []).append(token.encode("ascii"))
            if bound is not None:
                if tenants.get(token.encode("ascii"), bound) != bound:
                    raise ConfigError(f"{where}: this token is bound to another tenant on an earlier line")
                tenants[token.encode("ascii")] = bound
        if not table:
            raise ConfigError(f"{source}: no 'group:token' line; it would protect nothing")
        return cls({g: tuple(ts) for g, ts in table.items()}, tenants)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TokenTable:
        """Read a token file (format in the module docstring). Errors name the file and the line."""
        source = f"token file '{os.fspath(path)}'"
        try:
            with open(path, encoding="utf-8") as f:
                mode = os.fstat(f.fileno()).st_mode
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot be read ({type(exc).__name__})") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s can be read by other users; make it readable by the server's user only", source)
        return cls.from_lines(text.splitlines(), source)

    @property
    def protected_groups(self) -> tuple[str, ...]:
        """The groups that need a token (every group when `*` has one)."""
        if ALL_GROUPS in self.tokens:
            return GROUPS
        return tuple(g for g in GROUPS if g in self.tokens)

    def required(self, method: str) -> tuple[str, tuple[bytes, ...]] | None:
        """(group, accepted tokens) for a method path, or None when the method is open."""
        return self.required_for_group(method_group(method))

    def required_for_group(self, group: str | None) -> tuple[str, tuple[bytes, ...]] | None:
        """(group, accepted tokens) for a group (None: a method or path of no group), or None when open."""
        accepted = self.tokens.get(group, ()) if group is not None else ()
        accepted += self.tokens.get(ALL_GROUPS, ())
        if not accepted:
            return None
        return (group or ALL_GROUPS), accepted

    @staticmethod
    def matches(given: bytes, accepted: tuple[bytes, ...]) -> bool:
        """Constant-time membership: every accepted token is compared, whichever matches."""
        found = False
        for token in accepted:
            found |= hmac.compare_digest(given, token)
        return found


def request_tenant(table: TokenTable | None, metadata: Iterable[Any] | None, claimed: str | None) -> str | None:
    """The tenant a request runs as: the one its bearer token is bound to (PermissionDeniedError when it
    claims another), else the one it claims (None: none)."""
    if table is None or not table.tenants:
        return claimed
    token, _ = bearer_token(metadata)
    if token is None:
        return claimed
    bound = None
    for known, tenant in table.tenants.items():  # every entry compared, in constant time
        if hmac.compare_digest(token, known):
            bound = tenant
    if bound is None:
        return claimed
    if claimed and claimed != bound:
        raise PermissionDeniedError(f"this bearer token is bound to another tenant than '{claimed[:64]}'")
    return bound


def bearer_token(metadata: Iterable[Any] | None) -> tuple[bytes | None, str]:
    """The token of the request's `authorization: Bearer <token>` metadata, or None and why not."""
    values = [v for k, v in (metadata or ()) if k == "authorization"]
    if not values:
        return None, "no 'authorization' metadata"
    if len(values) > 1:
        return None, "more than one 'authorization' metadata entry"
    value = values[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None, "the 'authorization' metadata is not ASCII"
    scheme, _, token = str(value).strip().partition(" ")
    if scheme.lower() != _BEARER:
        return None, "the 'authorization' metadata is not 'Bearer <token>'"
    token = token.strip()
    if not _valid_token(token):
        return None, "the bearer token is empty or malformed"
    return token.encode("ascii"), ""


def _deny_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails with UNAUTHENTICATED, reading nothing."""

    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # No deserializer: the request is never parsed for a caller that is not authenticated.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, an RPC of a protected group without a valid bearer token."""

    def __init__(self, table: TokenTable) -> None:
        self.table = table

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        required = self.table.required(method)
        if handler is None or required is None:
            return handler  # an unknown method answers UNIMPLEMENTED; an open group runs as is
        group, accepted = required
        rpc = method.rsplit("/", 1)[-1]
        token, why = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            message = (
                f"{rpc} needs a bearer token for API group '{group}' ({why}); "
                "send the metadata 'authorization: Bearer <token>'"
            )
        elif not self.table.matches(token, accepted):
            message = f"{rpc}: the bearer token is not valid for API group '{group}'"
        else:
            return handler
        log.info("refused %s: %s", rpc, message)
        return _deny_handler(handler, message)


# ------------------------------------------------------------------------------------------------------
# TLS


def _read_pem(what: str, path: str | os.PathLike[str]) -> bytes:
    source = f"{what} '{os.fspath(path)}'"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read ({type(exc).__name__})") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{source}: not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class TlsFiles:
    """The PEM contents of the server's certificate chain, its key and (for mutual TLS) the client CA."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def read_tls_files(
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    client_ca: str | os.PathLike[str] | None = None,
) -> TlsFiles | None:
    """Read the TLS files given on the command line; None when TLS is not asked for.

    A certificate needs its key and a key its certificate; a client CA needs both.
    """
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError("a TLS client CA needs the server's TLS certificate and key as well")
        return None
    if cert is None or key is None:
        raise ConfigError("TLS needs both the server's certificate and its private key")
    files = TlsFiles(
        cert_chain=_read_pem("TLS certificate", cert),
        private_key=_read_pem("TLS private key", key),
        client_ca=_read_pem("TLS client CA", client_ca) if client_ca is not None else None,
    )
    # gRPC reports a bad certificate or a key of another certificate only as "failed to bind"; the
    # stdlib's OpenSSL says which file is wrong.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")  # never a prompt: gRPC reads no encrypted key
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"TLS certificate '{os.fspath(cert)}' and key '{os.fspath(key)}' do not make a usable pair "
            f"({getattr(exc, 'reason', None) or type(exc).__name__})"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"TLS client CA '{os.fspath(client_ca)}' holds no usable certificate "
                f"({getattr(exc, 'reason', None) or type(exc).__name__})"
            ) from None
    return files


def server_ssl_context(
    cert: str | os.PathLike[str], key: str | os.PathLike[str], client_ca: str | os.PathLike[str] | None = None
) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 at least) for the HTTP front end; with a client CA, mutual TLS: a client
    without a certificate signed by it fails the handshake. The files are checked as `read_tls_files` does."""
    read_tls_files(cert, key, client_ca)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key, password=lambda: b"")
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS server credentials; with a client CA, mutual TLS that requires a client certificate."""
    return grpc.ssl_server_credentials(
        [(tls.private_key, tls.cert_chain)],
        root_certificates=tls.client_ca,
        require_client_auth=tls.mutual,
    )
