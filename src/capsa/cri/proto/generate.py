"""Compiles capsa's CRI subset (api.proto) into the Python modules next to it.

Run ``python -m capsa.cri.proto.generate`` (``make proto``) after editing api.proto and commit
api_pb2.py, api_pb2.pyi and api_pb2_grpc.py. A unit test fails when they are out of date.

The proto is compiled under its package path (``capsa/cri/proto/api.proto``) so that its name in
protobuf's global descriptor pool cannot clash with another library's ``api.proto``; the gRPC
module's absolute import of the messages is then made package-relative.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
SRC_ROOT = PROTO_DIR.parents[2]
PROTO_FILE = PROTO_DIR / "api.proto"
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")

_ABSOLUTE_IMPORT = "from capsa.cri.proto import api_pb2 as"
_RELATIVE_IMPORT = "from . import api_pb2 as"


class ProtoCompileError(RuntimeError):
    pass


def generate(out_dir: Path) -> list[Path]:
    """Writes the generated modules into ``out_dir`` and returns their paths."""
    from grpc_tools import protoc  # a development dependency, needed only here

    with tempfile.TemporaryDirectory(prefix="capsa-proto-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={SRC_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_FILE.relative_to(SRC_ROOT)),
        ]
        if protoc.main(args) != 0:
            raise ProtoCompileError(f"protoc failed on {PROTO_FILE} (its errors are above)")
        built = Path(tmp) / PROTO_DIR.relative_to(SRC_ROOT)
        written = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (built / name).read_text().replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT)
            (out_dir / name).write_text(text)
            written.append(out_dir / name)
    return written


def main() -> None:
    for path in generate(PROTO_DIR):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
