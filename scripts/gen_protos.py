"""Generate the Python code and type stubs for protos/omni/v1 into omni_rpc/v1.

protoc names generated modules after the proto package (``omni.v1``); we ship them inside
``omni_rpc.v1`` so the distribution has one top-level library package, which means the
cross-file imports protoc writes are rewritten. ``--check`` regenerates into a temporary folder
and fails when the committed files differ (the CI staleness check).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("omni") / "v1"
OUT_DIR = ROOT / "omni_rpc" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")

_IMPORT_REWRITES = (
    (re.compile(r"^from omni\.v1 import", re.MULTILINE), "from omni_rpc.v1 import"),
    (re.compile(r"\bomni\.v1\.(\w+_pb2)\b"), r"omni_rpc.v1.\1"),
)


def _plugin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the dev extra (mypy-protobuf)")
    return found


def generate(out_dir: Path) -> list[Path]:
    protos = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *[str(p.relative_to(PROTO_ROOT)) for p in protos],
        ]
        subprocess.run(cmd, check=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / PACKAGE_DIR).iterdir()):
            text = src.read_text()
            for pattern, replacement in _IMPORT_REWRITES:
                text = pattern.sub(replacement, text)
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    return written


def _generated_files(directory: Path) -> dict[str, str]:
    return {
        p.name: p.read_text() for p in directory.iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if omni_rpc/v1 is stale")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder of generated code")
    args = parser.parse_args()
    out_dir: Path = args.out
    if not args.check:
        for stale in out_dir.glob("*_pb2*"):
            stale.unlink()
        for path in generate(out_dir):
            print(path)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh, committed = _generated_files(Path(tmp)), _generated_files(out_dir)
    stale_names = sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )
    if stale_names:
        print(
            "generated code is stale, run `make proto`: " + ", ".join(stale_names),
            file=sys.stderr,
        )
        return 1
    print(f"generated code is current ({len(fresh)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
