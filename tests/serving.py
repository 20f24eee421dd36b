"""Helpers for the `vlmopt serve` tests: a real server in its own process on loopback, and HTTP calls to it."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

#: seconds a server may take to start on 2 shared cores (with --ray: a Ray Serve deployment)
START_TIMEOUT_S = 300


class Server:
    """`vlmopt serve ... --port 0 --json` in a process of its own; `url` once it answers. A context manager that
    stops it with SIGTERM and checks that it exited 0."""

    def __init__(self, *args: object):
        self.args = [sys.executable, "-m", "vlmopt", "serve", *map(str, args), "--port", "0", "--json"]
        self.process: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}
        self.exit_code: int | None = None

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        line = ""
        while time.monotonic() < deadline and not line:
            line = self.process.stdout.readline()  # type: ignore[union-attr]
            if not line and self.process.poll() is not None:
                break
        if not line:
            self.stop()
            raise AssertionError(f"vlmopt serve did not start (exit {self.process.returncode}): {self.process.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        try:
            self.ready = json.loads(line)
        except ValueError:
            self.stop()  # a server whose ready line is not JSON must not outlive the test
            raise AssertionError(f"vlmopt serve printed {line!r}, not one JSON line") from None
        return self

    @property
    def url(self) -> str:
        return self.ready["url"]

    def terminate(self, timeout: float = 180) -> int:
        """SIGTERM, then wait for the exit; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.exit_code = self.process.wait(timeout=timeout)
        return self.exit_code

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.terminate()
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def call(url: str, path: str, body: Any = None, method: str | None = None, timeout: float = 60) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or text, headers) of one request; a dict body is sent as JSON, bytes as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + path, data=data, method=method or ("POST" if data is not None else "GET"), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, raw, headers = exc.code, exc.read(), dict(exc.headers)
    text = raw.decode()
    try:
        return status, json.loads(text), {k.lower(): v for k, v in headers.items()}
    except ValueError:
        return status, text, {k.lower(): v for k, v in headers.items()}


def data_url(image: Any, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample of the server's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    _, text, _ = call(url, "/metrics")
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims `width` x `height` pixels (10 gigapixels by default) in a few bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
