"""The committed protobuf code is exactly what proto/torchnode.proto generates (run `make protos`)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["torchnode_pb2.py", "torchnode_pb2.pyi", "torchnode_pb2_grpc.py"]


def test_generated_code_is_fresh(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to run scripts/gen_protos.sh")
    env_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    subprocess.run(
        ["bash", str(ROOT / "scripts/gen_protos.sh"), str(tmp_path)], check=True, cwd=ROOT, env={"PATH": env_path}
    )
    for name in GENERATED:
        assert (tmp_path / name).read_text() == (ROOT / "protocol" / "wire" / name).read_text(), (
            f"{name} is stale: run make protos"
        )
