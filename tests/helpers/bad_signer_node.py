"""A node that starts signing wrongly mid-session, for tests only (never a production flag).

`python tests/helpers/bad_signer_node.py N join MODEL ...` runs the real `torchnode join`; after its first N
step replies (Inference or StepBatches) it signs every further one with a fresh key instead of its own, as a
node whose key was swapped or whose replies are forged on the way would.
Clients must refuse those replies and fail over.
"""

from __future__ import annotations

import sys


def main() -> None:
    honest_replies, args = int(sys.argv[1]), sys.argv[2:]
    from torchnode.cli import app
    from torchnode.protocol.wire import signing
    from torchnode.protocol.wire.identity import Identity

    real_sign, impostor, replies = signing.sign, Identity.generate(), [0]

    def sign(identity, method, message, **kwargs):
        if method in ("Inference", "StepBatches") and kwargs.get("in_reply_to"):
            replies[0] += 1
            if replies[0] > honest_replies:
                identity = impostor  # the node's replies, from now on signed by another key
        return real_sign(identity, method, message, **kwargs)

    signing.sign = sign  # test-only: the interceptor looks signing.sign up at each reply
    app(args, prog_name="torchnode")


if __name__ == "__main__":
    main()
