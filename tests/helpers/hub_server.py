"""A local stand-in for the Hugging Face hub: serves a folder as repository `repo_id` over HTTP on 127.0.0.1,
in the hub's URL layout, for huggingface_hub pointed at it with HF_ENDPOINT. It counts the bytes of every file
it sends, so a test can check which shards a node or a client downloaded.

Routes huggingface_hub uses for a download: `GET /api/models/{repo}/revision/{rev}` (the commit),
`GET /api/models/{repo}/tree/{rev}` (the file list), `HEAD` and `GET /{repo}/resolve/{rev}/{file}` (the file,
with its commit and ETag in headers).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "feedfacefeedfacefeedfacefeedfacefeedface"


class HubServer:
    def __init__(self, folder: Path, repo_id: str):
        self.folder, self.repo_id = Path(folder), repo_id
        self.sent: Counter[str] = Counter()  # file name -> bytes sent in GET bodies
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def bytes_sent(self, suffix: str = "") -> int:
        with self._lock:
            return sum(n for name, n in self.sent.items() if name.endswith(suffix))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_) -> None:  # quiet
                pass

            def _file(self) -> Path | None:
                prefix = f"/{hub.repo_id}/resolve/"
                if not self.path.startswith(prefix):
                    return None
                _revision, _, name = self.path[len(prefix) :].partition("/")
                path = hub.folder / name
                return path if path.is_file() and path.parent == hub.folder else None

            def _headers(self, path: Path, part: tuple[int, int] | None = None) -> None:
                """The hub's headers for `path`, or for bytes part = (first, last) of it (a 206)."""
                size = path.stat().st_size
                self.send_response(200 if part is None else 206)
                if part is not None:
                    self.send_header("Content-Range", f"bytes {part[0]}-{part[1]}/{size}")
                self.send_header("Content-Length", str(size if part is None else part[1] - part[0] + 1))
                self.send_header("ETag", f'"{hashlib.sha256(path.read_bytes()).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()

            def do_HEAD(self) -> None:
                path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                self._headers(path)

            def do_GET(self) -> None:
                if self.path.startswith(f"/api/models/{hub.repo_id}/"):
                    files = sorted(p for p in hub.folder.iterdir() if p.is_file())
                    if self.path.startswith(f"/api/models/{hub.repo_id}/tree/"):
                        listing = [
                            {
                                "type": "file",
                                "path": p.name,
                                "size": p.stat().st_size,
                                "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                            }
                            for p in files
                        ]
                    else:
                        listing = {"id": hub.repo_id, "sha": COMMIT, "siblings": [{"rfilename": p.name} for p in files]}
                    body = json.dumps(listing).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                data, part = path.read_bytes(), None
                wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if wanted:  # a byte range, as the hub serves one (safetensors headers are read this way)
                    part = int(wanted[1]), min(int(wanted[2] or len(data) - 1), len(data) - 1)
                    data = data[part[0] : part[1] + 1]
                self._headers(path, part)
                with hub._lock:  # counted before the bytes go out: the client may check as soon as it has them
                    hub.sent[path.name] += len(data)
                self.wfile.write(data)

        return Handler
