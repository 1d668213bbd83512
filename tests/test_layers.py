"""The README's layer order (Layout), checked: every import of every library module, TYPE_CHECKING ones and those
inside functions included, relative ones resolved, must point down the table below or within its own folder.

A unit test: it reads the source with `ast` and imports nothing of torchnode."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("torchnode", "api", "client", "coordinator", "node", "models", "protocol")

# The README's Layout: which folders each folder may import (its own always). Nothing imports upward.
ALLOWED: dict[str, set[str]] = {
    "torchnode": {"api", "client", "coordinator", "node", "models", "protocol"},  # CLI and the SDK's names
    "api": {"client", "models", "protocol"},  # -> client, and what client stands on
    "client": {"models", "protocol"},
    "coordinator": {"protocol"},
    "node": {"models", "protocol"},
    "models": set(),
    "protocol": set(),
}
# Protobuf and gRPC stay in the wire (protocol/wire) and the node's server (node/): nobody else speaks them.
WIRE_ONLY = {"grpc": ("protocol/wire", "node"), "google.protobuf": ("protocol/wire", "node")}


def module_name(path: Path) -> tuple[str, bool]:
    """(torchnode.* name of a library file, whether it is a package's __init__)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts[1:] if rel.parts[0] == "torchnode" else rel.parts)
    init = parts[-1] == "__init__"
    if init:
        parts.pop()
    return ".".join(["torchnode", *parts]), init


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, anywhere in it."""
    name, init = module_name(path)
    package = name.split(".") if init else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            if node.module is None:  # `from . import x`: x is a module of that package
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return found


def layer_of(module: str) -> str | None:
    """The folder a torchnode module lives in; None for anything outside torchnode."""
    parts = module.split(".")
    if parts[0] != "torchnode":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS[1:] else "torchnode"


def library_files() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def forbidden_arrows(files: list[Path]) -> list[str]:
    wrong = []
    for path in files:
        own = layer_of(module_name(path)[0])
        rel = path.relative_to(ROOT).as_posix()
        for line, target in imports(path):
            layer = layer_of(target)
            if layer is not None and layer != own and layer not in ALLOWED[own]:
                wrong.append(f"{rel}:{line} imports {target}: {own} -> {layer} is not in the README's layer order")
            for library, homes in WIRE_ONLY.items():
                if (target == library or target.startswith(library + ".")) and not rel.startswith(homes):
                    wrong.append(f"{rel}:{line} imports {target}: only {' and '.join(homes)} speak it")
    return wrong


def test_the_table_names_every_layer_and_no_circle():
    assert set(ALLOWED) == set(LAYERS)
    for layer, below in ALLOWED.items():
        for other in below:
            assert layer not in ALLOWED[other], f"{layer} <-> {other} would be a circle"


def test_imports_resolve_relative_and_type_checking_ones():
    """The reader itself: a relative import two levels up and one under TYPE_CHECKING are both seen."""
    found = {target: line for line, target in imports(ROOT / "client" / "model.py")}
    assert "torchnode.models.checkpoint" in found and "torchnode.client.session" in found
    chat = [target for _, target in imports(ROOT / "client" / "chat_session.py")]
    assert "torchnode.client.model" in chat  # imported only under TYPE_CHECKING


def test_no_import_points_up_the_layers():
    files = library_files()
    assert len(files) > 100
    wrong = forbidden_arrows(files)
    assert not wrong, "\n".join(wrong)
