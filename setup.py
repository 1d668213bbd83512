"""The wheel's package list, computed from the folders: the repository keeps its top-level layout (node/,
client/, protocol/, ...) and each folder maps onto `torchnode.<folder>`. Every directory below them that
has an `__init__.py` is a package, so a new subpackage is in the wheel without editing a list."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
TOP_LEVEL = ["torchnode", "api", "client", "coordinator", "models", "node", "protocol"]


def packages() -> dict[str, str]:
    """torchnode.* package name -> its folder, for every folder with an __init__.py."""
    found = {}
    for top in TOP_LEVEL:
        for init in sorted((ROOT / top).rglob("__init__.py")):
            folder = init.parent.relative_to(ROOT)
            parts = folder.parts[1:] if top == "torchnode" else folder.parts
            found[".".join(["torchnode", *parts])] = folder.as_posix()
    return found


PACKAGES = packages()
setup(packages=list(PACKAGES), package_dir=PACKAGES)
