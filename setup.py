"""Build script: the `_kpcore` extension (Cython + C headers) and the protocol descriptor set."""

from __future__ import annotations

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join("src", "kernelport", "protocol")
DESC_NAME = "kernelport_protos.desc"


def compile_protos() -> None:
    """Compile the project's .proto files into one FileDescriptorSet next to them.

    The server loads it into a private descriptor pool, so the `inference` package never
    clashes with another copy (tritonclient's) registered in the default pool.
    """
    from grpc_tools import protoc  # build requirement

    protos = sorted(glob.glob(os.path.join(HERE, PROTO_DIR, "*.proto")))
    if not protos:
        return
    include = os.path.join(HERE, PROTO_DIR)
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    out = os.path.join(HERE, PROTO_DIR, DESC_NAME)
    args = ["protoc", f"-I{include}", f"-I{well_known}", "--include_imports", f"--descriptor_set_out={out}"]
    args += [os.path.basename(p) for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(os.path.basename(p) for p in protos))


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


extensions = [
    Extension(
        "_kpcore.core",
        ["src/_kpcore/core.pyx"],
        include_dirs=["src/_kpcore/include"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
    ),
    Extension(  # the native gRPC transport (HTTP/2 + HPACK in C, one epoll thread)
        "_kpcore.h2",
        ["src/_kpcore/h2.pyx"],
        include_dirs=["src/_kpcore/include"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
        extra_link_args=["-pthread"],
    ),
]

setup(
    ext_modules=cythonize(extensions, language_level=3, compiler_directives={"boundscheck": False}),
    cmdclass={"build_py": BuildPyWithProtos},
)
