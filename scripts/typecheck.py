"""`make lint`'s type check: mypy with pyproject's [tool.mypy] (which packages, and why each choice).

mypy finds a module only by its folder, and this repository keeps its top-level layout: setup.py maps each
top-level folder with an __init__.py onto torchnode.<folder>, and torchnode/ onto torchnode itself. So this
builds that same mapping as symlinks under build/typecheck/torchnode/ (client -> ../../../client, ...; the files
of torchnode/ one by one), then runs mypy there and prints its findings with the repository's paths.

    .venv/bin/python scripts/typecheck.py [mypy arguments]
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck" / "torchnode"


def build_tree() -> None:
    """build/typecheck/torchnode: one symlink per package folder and per file of torchnode/, made afresh."""
    TREE.mkdir(parents=True, exist_ok=True)
    for old in TREE.iterdir():
        old.unlink()
    for folder in sorted(p.parent for p in ROOT.glob("*/__init__.py")):
        if folder.name == "torchnode":
            for f in sorted(folder.iterdir()):
                if f.suffix in (".py", ".pyi", ".typed"):
                    (TREE / f.name).symlink_to(os.path.relpath(f, TREE))
        else:
            (TREE / folder.name).symlink_to(os.path.relpath(folder, TREE))


def main() -> int:
    build_tree()
    done = subprocess.run(
        [sys.executable, "-m", "mypy", *sys.argv[1:]], cwd=ROOT, capture_output=True, text=True, check=False
    )
    prefix = f"{TREE.relative_to(ROOT)}/"
    for line in (done.stdout + done.stderr).splitlines():
        line = line.removeprefix(prefix)
        # the CLI's own files sit at the tree's top; anything else is a package folder of the repository
        head = line.split(":", 1)[0]
        if head.endswith(".py") and "/" not in head and (ROOT / "torchnode" / head).exists():
            line = "torchnode/" + line
        print(line)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
