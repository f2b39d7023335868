"""A stand-in for the Hugging Face hub on a local port: the hub cannot be reached from here, and the download path
(plan, disk check, fetch, errors) must still run for real against the huggingface_hub client.

It serves the few routes `snapshot_download` uses (repository info, file tree, HEAD and GET of a file) for one
repository, and records every file it sent, so a test can tell that a refused download fetched nothing.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    """The repository it serves and what it has sent."""

    repo_id: str
    files: dict[str, Path]
    url: str = ""
    sent: list[str] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: ClassVar[FakeHub]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, *, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        repo = f"/api/models/{self.hub.repo_id}"
        if path.startswith(repo + "/tree/"):
            tree = [
                {"type": "file", "path": name, "size": file.stat().st_size, "oid": _oid(name)}
                for name, file in self.hub.files.items()
            ]
            self._json(tree, head=head)
        elif path.startswith(repo + "/revision/"):
            siblings = [{"rfilename": name, "size": file.stat().st_size} for name, file in self.hub.files.items()]
            self._json({"id": self.hub.repo_id, "sha": COMMIT, "siblings": siblings}, head=head)
        elif path.startswith(f"/{self.hub.repo_id}/resolve/") and path.rsplit("/", 1)[-1] in self.hub.files:
            name = path.rsplit("/", 1)[-1]
            file = self.hub.files[name]
            headers = {"ETag": f'"{_oid(name)}"', "X-Repo-Commit": COMMIT}
            self._send(200, file.read_bytes() if not head else b"", headers, size=file.stat().st_size)
            if not head:
                self.hub.sent.append(name)
        elif path.startswith("/api/models/"):
            self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        else:
            self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})

    def _json(self, value: object, *, head: bool) -> None:
        body = json.dumps(value).encode()
        self._send(200, b"" if head else body, {"Content-Type": "application/json"}, size=len(body))

    def _send(self, status: int, body: bytes, headers: dict[str, str], size: int | None = None) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if size is None else size))
        self.end_headers()
        self.wfile.write(body)


def _oid(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()  # noqa: S324 - an id, as the hub's git oids are


@contextmanager
def fake_hub(repo_id: str, files: dict[str, Path]) -> Iterator[FakeHub]:
    """Serve one repository on 127.0.0.1 until the block ends."""
    hub = FakeHub(repo_id, files)
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
