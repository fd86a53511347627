"""Regenerate the Python code for protos/ into meterline/v1/.

protoc (grpcio-tools) writes the messages (``*_pb2.py``) and the gRPC
client and server code (``*_pb2_grpc.py``); mypy-protobuf's two plugins
write their typed stubs (``*_pb2.pyi``, ``*_pb2_grpc.pyi``), which is what
mypy reads for callers. The output depends only on the .proto files and the
pinned grpcio-tools and mypy-protobuf versions, so `make check-proto` can
regenerate and fail on any diff.
"""

from __future__ import annotations

import pathlib
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT
# mypy-protobuf installs its plugins as scripts beside this interpreter
BIN = pathlib.Path(sys.executable).parent


def plugin(name: str) -> str:
    path = BIN / name
    if not path.exists():
        raise SystemExit(f"{path} not found: install the dev tools (pip install -e '.[dev]')")
    return str(path)


def main() -> int:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={OUT}",
        f"--mypy_out=quiet:{OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_grpc_out=quiet:{OUT}",
        *sources,
    ]
    code: int = protoc.main(args)
    if code != 0:
        return code
    for package in {pathlib.Path(s).parent for s in sources}:
        init = OUT / package / "__init__.py"
        init.write_text('"""Generated from protos/ by scripts/gen_protos.py; do not edit."""\n')
    return 0


if __name__ == "__main__":
    sys.exit(main())
