"""KernelPort's protocol messages, loaded from the compiled descriptor set of the `.proto` files here.

The build (setup.py) compiles every `*.proto` in this folder into one FileDescriptorSet,
`kernelport_protos.desc`. We load it into a private DescriptorPool, never the default one:
`tritonclient` registers the same `inference.*` names in the default pool, and both must be usable
in one process. In a source checkout, where the set is missing or older than a `.proto`, it is
compiled on first use with the same protoc arguments as setup.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

__all__ = [
    "DESCRIPTOR_SET_NAME",
    "PROTO_DIR",
    "compile_descriptor_set",
    "descriptor_pool_for_protos",
    "message_class",
]

log = logging.getLogger(__name__)

PROTO_DIR = Path(__file__).resolve().parent
DESCRIPTOR_SET_NAME = "kernelport_protos.desc"

_lock = threading.Lock()
_pool: descriptor_pool.DescriptorPool | None = None


def _proto_files(proto_dir: Path) -> list[Path]:
    return sorted(proto_dir.glob("*.proto"))


def compile_descriptor_set(out: Path, proto_dir: Path | None = None) -> None:
    """Compile every `*.proto` in `proto_dir` (default: this folder) into one FileDescriptorSet at `out`.

    The arguments are those of setup.py's `compile_protos` (keep the two identical).
    """
    from grpc_tools import protoc  # a build requirement; needed at run time only in a source checkout

    if proto_dir is None:
        proto_dir = PROTO_DIR
    protos = _proto_files(proto_dir)
    if not protos:
        raise RuntimeError("no .proto files to compile")
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{proto_dir}", f"-I{well_known}", "--include_imports", f"--descriptor_set_out={out}"]
    args += [p.name for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(p.name for p in protos))


def _read_set(path: Path) -> descriptor_pb2.FileDescriptorSet | None:
    try:
        return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    except (OSError, ValueError):
        return None


def _is_current(desc: descriptor_pb2.FileDescriptorSet, desc_path: Path, protos: list[Path]) -> bool:
    """True when the set holds every .proto here and none was modified after it was written."""
    names = {f.name for f in desc.file}
    if any(p.name not in names for p in protos):
        return False
    built = desc_path.stat().st_mtime
    return all(p.stat().st_mtime <= built for p in protos)


def _compile_into_place(desc_path: Path) -> bytes:
    """Compile next to the sources (atomically, as workers may start at once), else in a temp dir."""
    if not os.access(desc_path.parent, os.W_OK):
        tmp_dir = tempfile.mkdtemp(prefix="kernelport-protos-")
        try:
            tmp = Path(tmp_dir) / DESCRIPTOR_SET_NAME
            compile_descriptor_set(tmp)
            return tmp.read_bytes()
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    # A name unique to this process and thread; protoc creates it with the umask's permissions.
    tmp = desc_path.with_name(f".{DESCRIPTOR_SET_NAME}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        compile_descriptor_set(tmp)
        data = tmp.read_bytes()
        os.replace(tmp, desc_path)
        return data
    finally:
        tmp.unlink(missing_ok=True)


def _load_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    desc_path = PROTO_DIR / DESCRIPTOR_SET_NAME
    protos = _proto_files(PROTO_DIR)
    existing = _read_set(desc_path) if desc_path.exists() else None
    if existing is not None and (not protos or _is_current(existing, desc_path, protos)):
        return existing
    try:
        data = _compile_into_place(desc_path)
    except ImportError:
        # An installed package without grpc_tools: a set shipped with it is the best there is.
        if existing is None:
            raise RuntimeError(
                f"{DESCRIPTOR_SET_NAME} is missing and grpcio-tools is not installed to compile it"
            ) from None
        log.warning(
            "%s looks older than its .proto files; grpcio-tools is absent, using it", DESCRIPTOR_SET_NAME
        )
        return existing
    return descriptor_pb2.FileDescriptorSet.FromString(data)


def descriptor_pool_for_protos() -> descriptor_pool.DescriptorPool:
    """The private pool holding every message of this folder's .proto files (built once, thread-safe)."""
    global _pool
    pool = _pool
    if pool is not None:
        return pool
    with _lock:
        if _pool is None:
            new_pool = descriptor_pool.DescriptorPool()
            # protoc writes --include_imports sets in dependency order, so each file's imports are present.
            for file_proto in _load_descriptor_set().file:
                new_pool.Add(file_proto)
            _pool = new_pool
        return _pool


def message_class(full_name: str) -> type[Message]:
    """The message class for a fully qualified name, e.g. `message_class("inference.ModelConfig")`."""
    pool = descriptor_pool_for_protos()
    try:
        descriptor = pool.FindMessageTypeByName(full_name)
    except KeyError:
        raise KeyError(f"no message named {full_name!r} in KernelPort's .proto files") from None
    return message_factory.GetMessageClass(descriptor)
