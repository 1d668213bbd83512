#!/usr/bin/env bash
# Regenerates protocol/wire/torchnode_pb2*.py(i) from proto/torchnode.proto.
# The generated gRPC module imports its sibling as a top-level module; we rewrite that one line into a
# relative import so the code lives inside the torchnode.protocol.wire package.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-protocol/wire}"
python -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/torchnode.proto
sed -i 's/^import torchnode_pb2 as torchnode__pb2$/from . import torchnode_pb2 as torchnode__pb2/' "$out/torchnode_pb2_grpc.py"
