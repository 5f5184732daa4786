"""Real servers for tests that read shards over HTTP: nginx serving a directory, and a proxy in front of it that
misbehaves the way networks and object stores do."""

from __future__ import annotations

import itertools
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from data_pipeline.common.network import free_port


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


class Nginx:
    """nginx (from the distribution's package, which `make test` installs) serving `root` on a free port."""

    def __init__(self, root: Path, workdir: Path):
        self.root, self.workdir, self.port = root, workdir, free_port()
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Nginx:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "nginx.conf"
        config.write_text(
            f"daemon off;\nmaster_process off;\npid {self.workdir / 'nginx.pid'};\n"
            f"error_log {self.workdir / 'error.log'};\nevents {{}}\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {self.workdir / 'body'};\n"
            f"  server {{\n    listen 127.0.0.1:{self.port};\n    root {self.root};\n  }}\n}}\n"
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = subprocess.Popen([nginx, "-p", str(self.workdir), "-c", str(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def __exit__(self, *_) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ThreadedServer:
    """A server on a free port of 127.0.0.1 that answers each connection in a thread of its own (`_serve`)."""

    def __init__(self):
        self.port = free_port()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))

    def __enter__(self):
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *_) -> None:
        self._listener.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        raise NotImplementedError


class FaultyProxy(ThreadedServer):
    """A TCP proxy to `upstream_port` that, connection by connection in a fixed rotation, passes the exchange
    through, answers 503 itself, resets the connection part-way through the response, or waits before passing
    it through. Counts what it did, and the requests that asked for the rest of a file (an HTTP range)."""

    FAULTS = ("pass", "503", "reset", "delay")

    def __init__(self, upstream_port: int, cut_after_bytes: int = 3000, delay_seconds: float = 0.3):
        super().__init__()
        self.upstream_port, self.cut_after_bytes, self.delay_seconds = upstream_port, cut_after_bytes, delay_seconds
        self.counts = dict.fromkeys(self.FAULTS, 0)
        self.ranged_requests = 0
        self._rotation = itertools.cycle(self.FAULTS)

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            fault = next(self._rotation)
            self.counts[fault] += 1
        with client:
            request = client.recv(65536)
            if b"\r\nrange: bytes=" in request.lower():
                with self._lock:
                    self.ranged_requests += 1
            if fault == "503":
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            if fault == "delay":
                time.sleep(self.delay_seconds)
            with socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
                upstream.sendall(request)
                sent = 0
                while chunk := upstream.recv(65536):
                    if fault == "reset" and sent + len(chunk) > self.cut_after_bytes:
                        client.sendall(chunk[: self.cut_after_bytes - sent])
                        time.sleep(0.2)  # the client reads what came; then the connection drops
                        # SO_LINGER with a zero timeout: close sends a reset, as a dropped connection does.
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    client.sendall(chunk)
                    sent += len(chunk)


class UnrulyServer(ThreadedServer):
    """An HTTP server for the files under `root` that announces no length (the connection's end ends the body)
    and sends each file followed by `extra_bytes` of zeros, as a server holding another object than the manifest
    describes would, `chunk_bytes` at a time with `pause_seconds` between chunks (a trickle). Counts the bytes it
    got out to its clients."""

    def __init__(self, root: Path, extra_bytes: int = 0, chunk_bytes: int = 65536, pause_seconds: float = 0.0):
        super().__init__()
        self.root, self.extra_bytes = root, extra_bytes
        self.chunk_bytes, self.pause_seconds = chunk_bytes, pause_seconds
        self.sent_bytes = 0

    def _serve(self, client: socket.socket) -> None:
        with client:
            path = client.recv(65536).split(b" ")[1].decode().lstrip("/")
            body = (self.root / path).read_bytes()
            client.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            zeros = bytes(self.chunk_bytes)
            offset, total = 0, len(body) + self.extra_bytes
            try:
                while offset < total:
                    chunk = body[offset:offset + self.chunk_bytes] or zeros[: total - offset]
                    client.sendall(chunk)
                    offset += len(chunk)
                    with self._lock:
                        self.sent_bytes += len(chunk)
                    time.sleep(self.pause_seconds)
            except OSError:  # the client hung up
                pass
