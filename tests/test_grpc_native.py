"""The native gRPC engine's transport (`_kpcore.h2`, `kernelport.protocol.grpc_native`).

The rest of the gRPC suite runs against either engine (`KERNELPORT_GRPC_ENGINE`); this module checks what
only the transport decides: HPACK decoding against RFC 7541's own examples, then a real server
(`kernelport serve --grpc-engine native`) driven by tritonclient and by a raw HTTP/2 client written here,
which sends what no well-behaved client would. After each hostile connection the server must still answer
ServerLive, on a fresh connection (and, where the connection survives, on the same one).
"""

from __future__ import annotations

import queue
import random
import socket
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from _kpcore.h2 import HpackDecoder, HpackError, huffman_decode
from conftest import ServerProcess

pytestmark = pytest.mark.timeout(60)

# ------------------------------------------------------------------------------------------------------
# HPACK against RFC 7541 Appendix C


@pytest.mark.parametrize(
    ("coded", "text"),
    [  # RFC 7541 C.4.1-C.4.3 and C.6.1 (Huffman-coded strings)
        ("f1e3c2e5f23a6ba0ab90f4ff", b"www.example.com"),
        ("a8eb10649cbf", b"no-cache"),
        ("25a849e95ba97d7f", b"custom-key"),
        ("25a849e95bb8e8b4bf", b"custom-value"),
        ("6402", b"302"),
        ("aec3771a4b", b"private"),
        ("d07abe941054d444a8200595040b8166e082a62d1bff", b"Mon, 21 Oct 2013 20:13:21 GMT"),
        ("9d29ad171863c78f0b97c8e9ae82ae43d3", b"https://www.example.com"),
    ],
)
def test_huffman_rfc_examples(coded: str, text: bytes) -> None:
    assert huffman_decode(bytes.fromhex(coded)) == text


def test_huffman_rejects_bad_padding_and_eos() -> None:
    assert huffman_decode(bytes.fromhex("1f")) == b"a"   # 'a' = 00011, then three 1 bits of padding
    with pytest.raises(ValueError):
        huffman_decode(bytes.fromhex("18"))              # 'a' then padding 000: padding must be ones
    with pytest.raises(ValueError):
        huffman_decode(bytes.fromhex("ffffffff"))        # 30 ones = EOS inside the string
    with pytest.raises(ValueError):
        huffman_decode(bytes.fromhex("1fff"))            # 'a' and 11 bits of padding (more than 7)


def test_hpack_rfc_request_sequence_with_huffman() -> None:
    """RFC 7541 C.4: three requests on one connection; the dynamic table carries entries across them."""
    d = HpackDecoder()
    first = d.decode(bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff"))
    assert first == [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                     (b":authority", b"www.example.com")]
    second = d.decode(bytes.fromhex("828684be5886a8eb10649cbf"))
    assert second == first + [(b"cache-control", b"no-cache")]
    third = d.decode(bytes.fromhex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"))
    assert third == [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
                     (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")]


def test_hpack_rfc_responses_with_eviction() -> None:
    """RFC 7541 C.5 needs a 256-byte table; ours is 4096, so the size update at the start of the first block
    shrinks it, and entries are evicted as in the RFC's walk-through."""
    d = HpackDecoder()
    r1 = d.decode(bytes.fromhex("3fe1014803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31"
                                "333a323120474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d"))
    assert r1[0] == (b":status", b"302") and r1[3] == (b"location", b"https://www.example.com")
    r2 = d.decode(bytes.fromhex("4803333037c1c0bf"))
    assert r2 == [(b":status", b"307"), (b"cache-control", b"private"),
                  (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"), (b"location", b"https://www.example.com")]


def test_hpack_rejects_bad_blocks() -> None:
    for block in ("80", "be", "3fe21f", "0f", "4005" + "61"):  # index 0, empty dynamic index, table > 4096,
        with pytest.raises(HpackError):                       # truncated integer, truncated string
            HpackDecoder().decode(bytes.fromhex(block))


# ------------------------------------------------------------------------------------------------------
# a raw HTTP/2 client

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONT = range(10)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
LIVE = "/inference.GRPCInferenceService/ServerLive"
METADATA = "/inference.GRPCInferenceService/ModelMetadata"


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


def hpack_int(value: int, prefix: int, first: int = 0) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: str, value: str | bytes, indexed: bool = False) -> bytes:
    """A literal field with a new name: with incremental indexing (0x40) or without (0x00); no Huffman."""
    raw_name = name.encode()
    raw_value = value.encode() if isinstance(value, str) else value
    return (bytes([0x40 if indexed else 0x00]) + hpack_int(len(raw_name), 7) + raw_name
            + hpack_int(len(raw_value), 7) + raw_value)


def request_block(path: str, *extra: bytes) -> bytes:
    return (literal(":method", "POST") + literal(":scheme", "http") + literal(":path", path)
            + literal(":authority", "test") + literal("content-type", "application/grpc")
            + literal("te", "trailers") + b"".join(extra))


def grpc_message(payload: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + struct.pack(">I", len(payload)) + payload


@dataclass
class Reply:
    headers: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    data_frames: list[int] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None

    @property
    def fields(self) -> dict[bytes, bytes]:
        return {k: v for block in self.headers for k, v in block}

    @property
    def status(self) -> int:
        return int(self.fields[b"grpc-status"])


class H2Conn:
    """One HTTP/2 connection to the server, frame by frame."""

    def __init__(self, port: int, settings: dict[int, int] | None = None, preface: bytes = PREFACE) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""
        self.hpack = HpackDecoder()
        self.replies: dict[int, Reply] = {}
        self.goaway: tuple[int, int] | None = None
        self.pings: list[bytes] = []
        self.next_id = 1
        payload = b"".join(struct.pack(">HI", k, v) for k, v in (settings or {}).items())
        self.sock.sendall(preface + frame(SETTINGS, 0, 0, payload))

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_frame(self) -> tuple[int, int, int, bytes] | None:
        """The next frame, None at end of stream."""
        while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        n = int.from_bytes(self.buf[:3], "big")
        kind, flags, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
        payload, self.buf = self.buf[9:9 + n], self.buf[9 + n:]
        reply = self.replies.setdefault(sid, Reply()) if sid else None
        if kind == HEADERS and reply is not None:
            assert flags & END_HEADERS, "the server's header blocks fit one frame here"
            reply.headers.append(self.hpack.decode(payload))
            reply.ended |= bool(flags & END_STREAM)
        elif kind == DATA and reply is not None:
            reply.data += payload
            reply.data_frames.append(len(payload))
            reply.ended |= bool(flags & END_STREAM)
        elif kind == RST and reply is not None:
            reply.reset = int.from_bytes(payload, "big")
        elif kind == GOAWAY:
            self.goaway = (int.from_bytes(payload[:4], "big"), int.from_bytes(payload[4:8], "big"))
        elif kind == PING and flags & ACK:
            self.pings.append(payload)
        return kind, flags, sid, payload

    def wait(self, sid: int) -> Reply:
        """Read until stream `sid` ends (END_STREAM or RST_STREAM)."""
        while True:
            reply = self.replies.get(sid)
            if reply is not None and (reply.ended or reply.reset is not None):
                return reply
            if self.read_frame() is None:
                raise ConnectionError(f"connection closed before stream {sid} ended (GOAWAY {self.goaway})")

    def drain(self) -> None:
        """Read until the server closes the connection."""
        try:
            while self.read_frame() is not None:
                pass
        except ConnectionResetError:
            pass

    def send_data(self, sid: int, data: bytes, end: bool) -> None:
        """DATA frames of at most 16 KiB (the size every peer accepts before it has read our SETTINGS)."""
        chunks = [data[i:i + 16384] for i in range(0, len(data), 16384)] or [b""]
        self.send(b"".join(frame(DATA, END_STREAM if end and i == len(chunks) - 1 else 0, sid, chunk)
                           for i, chunk in enumerate(chunks)))

    def request(self, path: str, message: bytes | None = b"", *extra: bytes, end: bool = True) -> int:
        sid = self.next_id
        self.next_id += 2
        block = request_block(path, *extra)
        self.send(frame(HEADERS, END_HEADERS | (END_STREAM if end and message is None else 0), sid, block))
        if message is not None:
            self.send_data(sid, grpc_message(message), end)
        return sid

    def live(self) -> bool:
        reply = self.wait(self.request(LIVE))
        assert reply.status == 0, reply.fields
        return service_pb2.ServerLiveResponse.FromString(bytes(reply.data[5:])).live


# ------------------------------------------------------------------------------------------------------
# the server


@pytest.fixture(scope="module")
def native(example_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    sock = str(tmp_path_factory.mktemp("h2") / "kp.sock")
    proc = ServerProcess.with_ports(example_repo, sock, "--grpc-engine", "native", grpc=True)
    assert "native engine" in proc.log()
    yield proc
    assert proc.stop() == 0
    assert "Traceback" not in proc.log(), proc.log()


def live_on_new_connection(port: int) -> bool:
    conn = H2Conn(port)
    try:
        return conn.live()
    finally:
        conn.close()


def test_tritonclient_unary_stream_and_errors(native: ServerProcess) -> None:
    url = f"127.0.0.1:{native.grpc_port}"
    with grpcclient.InferenceServerClient(url) as c:
        assert c.is_server_live() and c.is_server_ready()
        a = np.arange(16, dtype=np.float32).reshape(1, 16)
        b = np.full((1, 16), 3.0, np.float32)
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        r = c.infer("add_sub", inputs, headers={"x-custom": "1"})
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
        for algorithm in ("gzip", "deflate"):  # compressed requests, as grpcio's server takes them
            r = c.infer("add_sub", inputs, compression_algorithm=algorithm)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
        with pytest.raises(InferenceServerException) as err:
            c.get_model_metadata("no_such_model")
        assert err.value.status() == "StatusCode.NOT_FOUND" and "no_such_model" in err.value.message()

        results: queue.Queue[object] = queue.Queue()
        c.start_stream(callback=lambda result, error: results.put(error or result))
        for i in range(5):
            c.async_stream_infer("add_sub", inputs, request_id=str(i))
        got = {}
        for _ in range(5):
            item = results.get(timeout=20)
            assert not isinstance(item, Exception), item
            got[item.get_response().id] = item.as_numpy("OUTPUT0")  # type: ignore[attr-defined]
        c.stop_stream()
        assert sorted(got) == [str(i) for i in range(5)]
        for out in got.values():
            np.testing.assert_array_equal(out, a + b)


def test_grpc_health_watch_streams(native: ServerProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{native.grpc_port}") as ch:
        watch = ch.unary_stream("/grpc.health.v1.Health/Watch")
        call = watch(b"", timeout=10)  # HealthCheckRequest{} serializes to b""
        first = next(iter(call))
        assert first == b"\x08\x01"  # HealthCheckResponse{status: SERVING}
        call.cancel()
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        assert check(b"", timeout=10) == b"\x08\x01"


def test_raw_client_unary_and_ping(native: ServerProcess) -> None:
    conn = H2Conn(native.grpc_port)
    try:
        assert conn.live()
        conn.send(frame(PING, 0, 0, b"12345678"))
        while not conn.pings:
            assert conn.read_frame() is not None
        assert conn.pings == [b"12345678"]
        # an unknown method, a compressed message: clear statuses, and the connection goes on
        assert conn.wait(conn.request("/inference.GRPCInferenceService/NoSuchRpc")).status == 12
        sid = conn.request(LIVE, None, end=False)
        conn.send(frame(DATA, END_STREAM, sid, grpc_message(b"xx", flag=1)))
        assert conn.wait(sid).status == 13  # INTERNAL: the compressed flag without a grpc-encoding
        sid = conn.request(LIVE, None, literal("grpc-encoding", "br"))
        assert conn.wait(sid).status == 12  # UNIMPLEMENTED: an encoding the server does not know
        # gzip and deflate requests are inflated; a message that does not inflate is INTERNAL
        for wbits, name in ((31, "gzip"), (15, "deflate")):
            packer = zlib.compressobj(wbits=wbits)
            packed = packer.compress(b"") + packer.flush()
            sid = conn.request(LIVE, None, literal("grpc-encoding", name), end=False)
            conn.send(frame(DATA, END_STREAM, sid, grpc_message(packed, flag=1)))
            reply = conn.wait(sid)
            assert reply.status == 0 and reply.data[5:] == b"\x08\x01", name
        sid = conn.request(LIVE, None, literal("grpc-encoding", "gzip"), end=False)
        conn.send(frame(DATA, END_STREAM, sid, grpc_message(b"not gzip", flag=1)))
        assert conn.wait(sid).status == 13
        # a message larger than the maximum (2^31 - 1 by default) is refused from its prefix alone
        sid = conn.request(LIVE, None, end=False)
        conn.send(frame(DATA, 0, sid, b"\x00\xff\xff\xff\xff"))
        assert conn.wait(sid).status == 8  # RESOURCE_EXHAUSTED
        assert conn.live()
    finally:
        conn.close()


def test_bad_preface_gets_goaway(native: ServerProcess) -> None:
    conn = H2Conn(native.grpc_port, preface=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.drain()
    assert conn.goaway is not None and conn.goaway[1] == 1  # PROTOCOL_ERROR
    conn.close()
    assert live_on_new_connection(native.grpc_port)


def test_oversized_frame_gets_goaway(native: ServerProcess) -> None:
    conn = H2Conn(native.grpc_port)
    conn.send(((16 << 20) - 1).to_bytes(3, "big") + bytes([DATA, 0]) + (1).to_bytes(4, "big") + b"x" * 1000)
    conn.drain()
    assert conn.goaway is not None and conn.goaway[1] == 6  # FRAME_SIZE_ERROR
    conn.close()
    assert live_on_new_connection(native.grpc_port)


def test_header_list_bombs(native: ServerProcess) -> None:
    conn = H2Conn(native.grpc_port)
    try:
        # 40 KiB of metadata in HEADERS + CONTINUATION: larger than the 16 KiB list the server accepts
        block = request_block(LIVE, *(literal(f"x-pad-{i}", "v" * 1000) for i in range(40)))
        sid = conn.next_id
        conn.next_id += 2
        parts = [block[i:i + 16000] for i in range(0, len(block), 16000)]
        conn.send(frame(HEADERS, 0, sid, parts[0]) + frame(CONT, 0, sid, parts[1])
                  + frame(CONT, END_HEADERS, sid, parts[2]) + frame(DATA, END_STREAM, sid, grpc_message(b"")))
        assert conn.wait(sid).status == 8  # RESOURCE_EXHAUSTED
        # a tiny block that expands: one 4 KB entry put in the dynamic table, then referenced 2,000 times
        sid = conn.next_id
        conn.next_id += 2
        bomb = literal("x-big", "b" * 4000, indexed=True) + b"\xbe" * 2000  # 0xbe: index 62, the newest entry
        conn.send(frame(HEADERS, END_HEADERS, sid, request_block(LIVE, bomb))
                  + frame(DATA, END_STREAM, sid, grpc_message(b"")))
        assert conn.wait(sid).status == 8
        assert conn.live()  # the HPACK state stayed in step: the same connection still works
    finally:
        conn.close()
    # a header block that never ends (CONTINUATION past the bound): the connection is refused
    conn = H2Conn(native.grpc_port)
    conn.send(frame(HEADERS, 0, 1, request_block(LIVE)))
    for _ in range(40):
        try:
            conn.send(frame(CONT, 0, 1, literal("x-more", "m" * 16000)))
        except OSError:
            break
    conn.drain()
    assert conn.goaway is not None and conn.goaway[1] == 11  # ENHANCE_YOUR_CALM
    conn.close()
    assert live_on_new_connection(native.grpc_port)


def test_flow_control_splits_the_response(native: ServerProcess) -> None:
    """The peer's window starts at 0: the response waits (the server keeps answering others), then goes out
    exactly as far as each WINDOW_UPDATE allows."""
    conn = H2Conn(native.grpc_port, settings={0x4: 0})  # SETTINGS_INITIAL_WINDOW_SIZE = 0
    try:
        request = service_pb2.ModelMetadataRequest(name="add_sub").SerializeToString()
        sid = conn.request(METADATA, request)
        while not conn.replies.get(sid, Reply()).headers:
            assert conn.read_frame() is not None
        assert live_on_new_connection(native.grpc_port)  # the blocked response holds no worker
        conn.send(frame(WINDOW, 0, sid, (10).to_bytes(4, "big")))
        while not conn.replies[sid].data_frames:
            assert conn.read_frame() is not None
        assert conn.replies[sid].data_frames == [10]
        conn.send(frame(WINDOW, 0, sid, (7).to_bytes(4, "big")))
        while len(conn.replies[sid].data_frames) < 2:
            assert conn.read_frame() is not None
        assert conn.replies[sid].data_frames == [10, 7]
        conn.send(frame(WINDOW, 0, sid, (1 << 20).to_bytes(4, "big")))
        reply = conn.wait(sid)
        assert reply.status == 0
        length = struct.unpack(">I", bytes(reply.data[1:5]))[0]
        assert len(reply.data) == 5 + length > 17
        assert service_pb2.ModelMetadataResponse.FromString(bytes(reply.data[5:])).name == "add_sub"
    finally:
        conn.close()


def test_large_response_respects_max_frame_and_window(native: ServerProcess) -> None:
    """identity_16m's 16 MiB answer over a stream window opened by an odd step at a time (so a frame that
    respects it must end exactly at the window's edge, never on a 16 KiB boundary)."""
    step = (1 << 20) + 1234
    conn = H2Conn(native.grpc_port, settings={0x4: step})
    try:
        x = np.arange(4 << 20, dtype=np.float32).reshape(1, 4 << 20)  # 16 MiB
        req = service_pb2.ModelInferRequest(model_name="identity_16m")
        tensor = req.inputs.add()
        tensor.name, tensor.datatype = "INPUT0", "FP32"
        tensor.shape.extend([1, 4 << 20])
        req.raw_input_contents.append(x.tobytes())
        sid = conn.request("/inference.GRPCInferenceService/ModelInfer", req.SerializeToString())
        granted = step
        conn.send(frame(WINDOW, 0, 0, (64 << 20).to_bytes(4, "big")))
        while True:
            reply = conn.replies.get(sid)
            if reply is not None and (reply.ended or reply.reset is not None):
                break
            if reply is not None and sum(reply.data_frames) == granted:
                conn.send(frame(WINDOW, 0, sid, step.to_bytes(4, "big")))
                granted += step
            assert conn.read_frame() is not None
        assert reply.status == 0, reply.fields
        assert max(reply.data_frames) <= 16384  # the peer's default SETTINGS_MAX_FRAME_SIZE
        assert sum(reply.data_frames) <= granted
        resp = service_pb2.ModelInferResponse.FromString(bytes(reply.data[5:]))
        np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[0], np.float32), x.ravel())
    finally:
        conn.close()


def test_reset_and_dropped_connections(native: ServerProcess) -> None:
    conn = H2Conn(native.grpc_port)
    try:
        # RST_STREAM in the middle of a request message: the stream goes, the connection stays
        sid = conn.request(METADATA, None, end=False)
        conn.send(frame(DATA, 0, sid, b"\x00\x00\x00\x00\x10" + b"\x0a"))
        conn.send(frame(RST, 0, sid, (8).to_bytes(4, "big")))
        assert conn.live()
        # DATA after the request ended: that stream fails, the connection stays
        sid = conn.request(LIVE)
        conn.send(frame(DATA, 0, sid, grpc_message(b"")))
        conn.wait(sid)
        assert conn.live()
    finally:
        conn.close()
    # a connection dropped in the middle of a message (and of a frame)
    conn = H2Conn(native.grpc_port)
    sid = conn.request(METADATA, None, end=False)
    conn.send(frame(DATA, 0, sid, b"\x00\x00\x00\x01\x00" + b"a" * 100)[:60])
    conn.close()
    assert live_on_new_connection(native.grpc_port)


def test_protocol_violations_get_goaway(native: ServerProcess) -> None:
    cases = [
        frame(HEADERS, END_HEADERS, 2, request_block(LIVE)),        # a client stream id must be odd
        frame(PUSH, END_HEADERS, 1, b"\x00\x00\x00\x02"),           # clients never push
        frame(SETTINGS, 0, 0, b"\x00\x04\x00"),                     # SETTINGS length not a multiple of 6
        frame(HEADERS, 0, 1, request_block(LIVE)) + frame(PING, 0, 0, b"8bytes!!"),  # CONTINUATION expected
        frame(HEADERS, END_HEADERS, 1, b"\x80"),                    # HPACK index 0
        frame(WINDOW, 0, 0, (0x7FFFFFFF).to_bytes(4, "big")),       # connection window past 2^31 - 1
    ]
    for bad in cases:
        conn = H2Conn(native.grpc_port)
        conn.send(bad)
        conn.drain()
        assert conn.goaway is not None and conn.goaway[1] != 0, bad[:16]
        conn.close()
    assert live_on_new_connection(native.grpc_port)


def test_many_connections_and_streams(native: ServerProcess) -> None:
    conns = [H2Conn(native.grpc_port) for _ in range(20)]
    try:
        sids = [[c.request(LIVE) for _ in range(10)] for c in conns]
        for c, ids in zip(conns, sids):
            for sid in ids:
                assert c.wait(sid).status == 0
    finally:
        for c in conns:
            c.close()
    assert live_on_new_connection(native.grpc_port)


def test_streams_beyond_the_limit_are_refused(native: ServerProcess) -> None:
    """SETTINGS_MAX_CONCURRENT_STREAMS is 1,024: the 1,025th open stream gets RST_STREAM REFUSED_STREAM, and
    the connection serves again once streams end."""
    conn = H2Conn(native.grpc_port)
    try:
        sids = [conn.request(LIVE, None, end=False) for _ in range(1025)]  # HEADERS only: requests still open
        reply = conn.wait(sids[-1])
        assert reply.reset == 7 and not reply.headers  # REFUSED_STREAM, nothing else
        for sid in sids[:-1]:
            conn.send(frame(RST, 0, sid, (8).to_bytes(4, "big")))
        assert conn.live()
    finally:
        conn.close()


def test_request_trailers_without_a_message_fail_that_stream_only(native: ServerProcess) -> None:
    conn = H2Conn(native.grpc_port)
    try:
        sid = conn.request(METADATA, None, end=False)  # request headers, no message yet
        conn.send(frame(HEADERS, END_HEADERS | END_STREAM, sid, literal("x-trailer", "1")))  # trailers: the end
        reply = conn.wait(sid)
        assert reply.status == 13  # INTERNAL: the request ended without its message
        assert conn.live()
    finally:
        conn.close()


def test_mutated_frames_never_take_the_server_down(native: ServerProcess) -> None:
    """A seeded fuzz: valid exchanges (requests, pings, window updates, settings, resets), each with a few
    bytes flipped, cut short or duplicated, over 100 connections; then the server still answers."""
    rng = random.Random(20261129)
    body = service_pb2.ModelMetadataRequest(name="add_sub").SerializeToString()
    templates = [
        frame(HEADERS, END_HEADERS, 1, request_block(METADATA)) + frame(DATA, END_STREAM, 1, grpc_message(body)),
        frame(HEADERS, 0, 1, request_block(LIVE)[:30]) + frame(CONT, END_HEADERS, 1, request_block(LIVE)[30:])
        + frame(DATA, END_STREAM, 1, grpc_message(b"")),
        frame(PING, 0, 0, b"pingpong") + frame(WINDOW, 0, 0, (1000).to_bytes(4, "big"))
        + frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 100) + struct.pack(">HI", 5, 20000)),
        frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block(LIVE, literal("x-a", "b", indexed=True)))
        + frame(HEADERS, END_HEADERS | END_STREAM, 3, request_block(LIVE) + b"\xbe")
        + frame(RST, 0, 1, (8).to_bytes(4, "big")),
        frame(HEADERS, END_HEADERS | 0x20 | 0x8, 1,  # PADDED and PRIORITY
              b"\x03" + b"\x00\x00\x00\x00\x10" + request_block(LIVE) + b"\x00" * 3),
    ]
    for _ in range(100):
        data = bytearray(rng.choice(templates))
        for _ in range(rng.randint(1, 4)):
            what = rng.random()
            i = rng.randrange(len(data))
            if what < 0.6:
                data[i] ^= 1 << rng.randrange(8)
            elif what < 0.8:
                data = data[:i]
            else:
                data = data[:i] + data[i:i + rng.randint(1, 40)] + data[i:]
            if not data:
                data = bytearray(b"\x00")
        conn = H2Conn(native.grpc_port)
        try:
            conn.send(bytes(data))
            conn.sock.settimeout(0.2)  # many mutations leave the server waiting for the rest: that is fine
            try:
                conn.drain()
            except (TimeoutError, ConnectionError, AssertionError, ValueError):
                pass
        finally:
            conn.close()
    assert live_on_new_connection(native.grpc_port)
    with grpcclient.InferenceServerClient(f"127.0.0.1:{native.grpc_port}") as c:
        assert c.get_model_metadata("add_sub").name == "add_sub"
