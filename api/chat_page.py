"""The chat page at `/chat`: one self-contained HTML file (api/static/chat.html) shipped in the package.

It loads nothing from any host (no CDN, no fonts, no build step) and talks only to this server's own OpenAI
endpoints. A Content-Security-Policy with the hashes of its one script and one style block makes that a
rule the browser enforces: nothing else runs, nothing is fetched from elsewhere, even if model output
were ever mistaken for markup (the page builds its DOM with textContent, so it is not).
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from pathlib import Path

PAGE = Path(__file__).parent / "static" / "chat.html"


@cache
def chat_page() -> tuple[bytes, str]:
    """The page's bytes and the Content-Security-Policy that lets exactly its own script and style run."""
    html = PAGE.read_text(encoding="utf-8")
    scripts = [_hash(s) for s in re.findall(r"<script>(.*?)</script>", html, re.S)]
    styles = [_hash(s) for s in re.findall(r"<style>(.*?)</style>", html, re.S)]
    policy = "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(scripts),
            "style-src " + " ".join(styles),
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return html.encode("utf-8"), policy


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"
