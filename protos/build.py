"""Regenerate the Python modules from swarm.proto: `python -m protos.build [--out DIR]`.

grpc_tools writes `import swarm_pb2` in the service module; we rewrite it to a package-relative
import so the generated code works as `protos.swarm_pb2_grpc` without touching sys.path.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # build-time dependency only (test extra)

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / "swarm.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on swarm.proto")
    grpc_module = out_dir / "swarm_pb2_grpc.py"
    text = grpc_module.read_text()
    text = re.sub(r"^import swarm_pb2 as", "from . import swarm_pb2 as", text, flags=re.M)
    grpc_module.write_text(text)
    return [out_dir / name for name in ("swarm_pb2.py", "swarm_pb2.pyi", "swarm_pb2_grpc.py")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_DIR)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
