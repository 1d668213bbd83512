"""Figures of the code's form (issue 22): long lines, lint findings, files per folder, largest files, and the
parameters of the commands and SDK calls users meet most. Run before and after a change and compare.

    .venv/bin/python scripts/form_figures.py
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("api", "client", "coordinator", "models", "node", "protocol", "torchnode")
GENERATED = "_pb2"


def python_files(folders: tuple[str, ...]) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if GENERATED not in p.name)


def long_lines(files: list[Path], limit: int = 120) -> tuple[int, int]:
    lengths = [len(line) for p in files for line in p.read_text().splitlines()]
    return sum(n > limit for n in lengths), max(lengths, default=0)


def lint_findings() -> dict[str, int]:
    """ruff's findings per rule over the whole tree (pyproject's configuration)."""
    out = subprocess.run(
        [str(ROOT / ".venv/bin/ruff"), "check", ".", "--output-format", "json", "--exit-zero"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(Counter(f["code"] for f in json.loads(out)).most_common())


def parameters() -> dict[str, int]:
    """Parameters of the CLI commands as typer sees them, and of the SDK's constructor and calls."""
    sys.path.insert(0, str(ROOT))
    from typer.main import get_command

    from torchnode.cli import app
    from torchnode.client.model import AsyncDistributedModel

    group = get_command(app)
    counts = {f"cli {name}": len(group.commands[name].params) for name in ("join", "generate", "chat", "api")}
    for name in ("join", "generate"):
        func = group.commands[name].callback
        counts[f"python signature of {name}"] = len(inspect.signature(inspect.unwrap(func)).parameters)
    for call in ("__init__", "from_pretrained", "generate", "open_session", "generate_ids"):
        sig = inspect.signature(getattr(AsyncDistributedModel, call))
        counts[f"AsyncDistributedModel.{call}"] = len([p for p in sig.parameters if p not in ("self", "cls")])
    return counts


def main() -> None:
    library, tests = python_files(LIBRARY), python_files(("tests",))
    over, longest = long_lines(library)
    test_over, test_longest = long_lines(tests)
    print(f"library lines over 120: {over} (longest {longest}); tests: {test_over} (longest {test_longest})")
    print(f"ruff findings: {lint_findings()}")
    per_folder = Counter(str(p.parent.relative_to(ROOT)) for p in library)
    print("files per folder:", dict(sorted(per_folder.items())))
    sizes = sorted(((len(p.read_text().splitlines()), str(p.relative_to(ROOT))) for p in library), reverse=True)
    print("largest library files:", ", ".join(f"{path} {n}" for n, path in sizes[:6]))
    for name, count in parameters().items():
        print(f"parameters of {name}: {count}")


if __name__ == "__main__":
    main()
