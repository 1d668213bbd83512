"""Fraud proof files for tests: one signed step of blocks 0:2 of a checkpoint, whose signed reply is the right
output (an honest node, so a false report) or a corrupted one (a liar). Written by the client's own
`write_evidence` (client/verification/evidence.py) under $TORCHNODE_HOME/evidence."""

from __future__ import annotations

import types
from pathlib import Path

import torch
from dishonest_node import corrupt

from torchnode.client.verification.evidence import write_evidence
from torchnode.client.verification.verifier import Finding
from torchnode.models.checkpoint import Checkpoint
from torchnode.models.families import load_span
from torchnode.protocol.wire import signing, tensor_codec
from torchnode.protocol.wire import torchnode_pb2 as pb
from torchnode.protocol.wire.identity import Identity

TOKENS = 5


def evidence_file(ckpt: Checkpoint, reporter: Identity, node: Identity, lie: bool, position: int = 0) -> Path:
    """An evidence file in which `node` signed the output of blocks 0:2 over random inputs, corrupted if `lie`;
    `position` only keeps file names apart."""
    span = load_span(ckpt, 0, 2, torch.float32)
    x = torch.randn(1, TOKENS, span.config.hidden_size, generator=torch.Generator().manual_seed(position))
    with torch.inference_mode():
        out = span(x, 0, 0, 2, span.new_caches(0, 2, 1, TOKENS))
    if lie:
        out = corrupt(out)
    request = pb.Step(session_id="s", step=0, position=0, wire_dtype="float32", max_length=TOKENS, batch_size=1)
    request.start_block, request.end_block = 0, 2
    request.hidden.CopyFrom(tensor_codec.encode(x, torch.float32))
    signing.sign(reporter, "Inference", request, audience=node.public_key)
    reply = pb.StepResult(session_id="s", step=0)
    reply.hidden.CopyFrom(tensor_codec.encode(out, torch.float32))
    signing.sign(node, "Inference", reply, in_reply_to=request.auth.signature)
    finding = Finding(
        types.SimpleNamespace(address="127.0.0.1:31330"),
        node.peer_id,
        0,
        2,
        position,
        1.0,
        1e-4,
        "this client",
        node.public_key,
        "float32",
        ((request.SerializeToString(), reply.SerializeToString(), b""),),
    )
    return write_evidence(finding, ckpt.name, ckpt.revision, reporter.public_key)
