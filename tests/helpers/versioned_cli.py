"""The real `torchnode` CLI speaking another protocol version, for tests only (never a production flag):

    python tests/helpers/versioned_cli.py 2.0 join MODEL --blocks 0:4 ...     # a node of protocol 2.0
    python tests/helpers/versioned_cli.py 0.9 generate MODEL PROMPT ...       # a client of protocol 0.9

Everything reads the protocol version through `torchnode.protocol.version.protocol()` at call time, so setting
the module's constant before the CLI runs makes the whole process announce, send and check that version.
"""

from __future__ import annotations

import sys


def main() -> None:
    speaks, args = sys.argv[1], sys.argv[2:]
    import torchnode.protocol.version as version

    version.protocol_major(speaks)  # MAJOR.MINOR, or a ValueError here
    version.PROTOCOL = speaks  # test-only: this process speaks another protocol
    from torchnode.cli import app

    app(args, prog_name="torchnode")


if __name__ == "__main__":
    main()
