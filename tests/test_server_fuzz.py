"""The reward server against hostile clients, as a separate process on loopback (`rewardflow serve-reward`).

Malformed bodies, oversized and decompression-bomb PNGs, slow clients, wrong tokens and a burst of 50 concurrent
connections: every answer is a 2xx, a 4xx or a 503, no connection is reset, the server answers a good request at
the end, and its peak memory stays under ``MEMORY_BOUND`` (read from /proc).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOKEN = "fuzz-token-0123456789"
MEMORY_BOUND = 0.75 * 2**30  # peak resident memory of the server process (0.26 GiB measured on the CI machine)
LIMITS = ["--limits.max-bytes", "4000000", "--limits.concurrency", "2", "--limits.queue", "8",
          "--limits.body-timeout", "1", "--limits.max-images", "16"]  # fmt: skip


def png(width: int, height: int, rng: np.random.Generator | None = None) -> bytes:
    pixels = (rng or np.random.default_rng(0)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb(side: int) -> bytes:
    """A valid PNG of ``side`` x ``side`` black pixels: a few hundred KB that would decode to 3 x side^2 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + 3 * side)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def body(images: list[bytes], prompts: list[str] | None = None) -> bytes:
    encoded = [base64.b64encode(i).decode() for i in images]
    prompts = prompts if prompts is not None else ["a red circle"] * len(images)
    return json.dumps({"prompts": prompts, "metadata": [{}] * len(prompts), "images": encoded}).encode()


@pytest.fixture(scope="module")
def server():
    env = {**os.environ, "RF_FUZZ_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rewardflow.cli", "serve-reward", "jpeg-compressibility", "--port", "0",
           "--token-env", "RF_FUZZ_TOKEN", *LIMITS]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = ""
    for line in proc.stdout:
        if line.startswith("serving"):
            break
    else:
        pytest.fail(f"the server did not start: {line}")
    port = int(line.split("http://127.0.0.1:")[1].split()[0])
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep its pipe drained
    yield proc, port
    proc.terminate()
    proc.wait(timeout=20)


class Client:
    """Sends requests and records every status; a reset connection is recorded as "reset"."""

    def __init__(self, port: int) -> None:
        self.port, self.statuses, self.lock = port, [], threading.Lock()

    def post(self, data: bytes | None, headers: dict | None = None, token: str | None = TOKEN, path: str = "/score",
             method: str = "POST") -> int | str:  # fmt: skip
        headers = dict(headers or {})
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            response.read()
            status: int | str = response.status
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as e:
            status = f"reset: {type(e).__name__}"
        finally:
            conn.close()
        with self.lock:
            self.statuses.append(status)
        return status

    def raw(self, head: bytes, payload: bytes = b"", pause: float = 0.0) -> int | str:
        """Send ``head`` and ``payload`` on a raw socket, optionally pausing between them (a slow client)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            try:
                sock.sendall(head)
                if pause:
                    time.sleep(pause)
                if payload:
                    sock.sendall(payload)
                answer = sock.recv(65536)
                status: int | str = int(answer.split(b" ")[1]) if answer else "closed without an answer"
            except (ConnectionResetError, BrokenPipeError) as e:
                status = f"reset: {type(e).__name__}"
        with self.lock:
            self.statuses.append(status)
        return status


def peak_memory(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
def test_the_server_holds_against_hostile_clients(server):
    proc, port = server
    client = Client(port)
    rng = random.Random(0)
    good = body([png(32, 32)] * 2, ["a", "b"])

    # Tokens: missing, wrong, almost right: 401 before the body is read.
    for token in (None, "", "wrong", TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
        headers = {"Authorization": "Basic abc"} if token == "" else {}
        assert client.post(good, headers, token=token) == 401
    assert client.post(None, method="GET", path="/health", token="nope") == 401

    # Malformed bodies: 400, naming what is wrong.
    ok_json = json.loads(good)
    malformed = [b"", b"{", b"[1,2,3]", b"null", b'"text"', b"\xff\xfe\x00garbage", b"[" * 100_000,
                 json.dumps({"prompts": 3, "images": {"a": 1}}).encode(),
                 json.dumps({**ok_json, "prompts": ["a"]}).encode(),
                 json.dumps({**ok_json, "images": ["not base64!"] * 2}).encode(),
                 json.dumps({**ok_json, "images": [base64.b64encode(b"GIF89a" + b"\0" * 30).decode()] * 2}).encode(),
                 json.dumps({**ok_json, "metadata": [1, 2]}).encode()]  # fmt: skip
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16)).save(jpeg, format="JPEG")
    malformed.append(body([jpeg.getvalue()] * 2, ["a", "b"]))  # a readable image, but not a PNG
    malformed.append(body([png(16, 16), png(32, 32)], ["a", "b"]))  # two sizes
    malformed.append(b'{"prompts": [' + b"1" * 5000 + b"]}")  # an integer too long for Python to convert
    zero = bytearray(png(8, 8))
    zero[16:20] = b"\0\0\0\0"  # a header that says 0 pixels wide
    malformed.append(body([bytes(zero)] * 2, ["a", "b"]))
    for _ in range(40):
        cut = bytearray(good[: rng.randrange(1, len(good))])
        for _ in range(rng.randrange(4)):
            cut[rng.randrange(len(cut))] = rng.randrange(256)
        malformed.append(bytes(cut))
    for data in malformed:
        status = client.post(data, {"Content-Type": "application/json"})
        assert status == 400, (data[:60], status)

    # Too big: declared (413 without reading), too many images, too many pixels per image and per request.
    assert client.raw(b"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                      + b"\r\nContent-Length: 999999999\r\n\r\n") == 413  # fmt: skip
    assert client.post(body([png(8, 8)] * 17)) == 413
    assert client.post(body([bomb(30_000)])) == 413  # 2.7 GB of pixels in a ~2.6 MB file
    assert client.post(body([bomb(2_100)])) == 413  # just over 2048^2 pixels
    assert client.post(body([png(1024, 1024)] * 3)) in (413, 400)  # 4 MB body limit or 2^24 pixels
    # No Content-Length (chunked): 411.
    chunked = b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nAuthorization: Bearer "
    assert client.raw(chunked + TOKEN.encode() + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n") == 411

    # A slow client: the body's deadline (1 s here) answers 408 and frees the slot.
    head = (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\n\r\n")  # fmt: skip
    assert client.raw(head, b"{" * 10, pause=0.1) == 408

    # A burst of 50 concurrent connections: answered (200) or turned away (503), none reset.
    burst = [threading.Thread(target=client.post, args=(good,)) for _ in range(50)]
    for t in burst:
        t.start()
    for t in burst:
        t.join()
    answers = client.statuses[-50:]
    assert set(answers) <= {200, 503} and answers.count(200) >= 10, answers

    # Still serving, and nothing went wrong on its side.
    assert client.post(good) == 200
    assert client.post(None, method="GET", path="/health") == 200
    resets = [s for s in client.statuses if isinstance(s, str)]
    server_errors = [s for s in client.statuses if isinstance(s, int) and s >= 500 and s != 503]
    assert not resets and not server_errors, (resets, server_errors)
    print(f"server peak memory {peak_memory(proc.pid) / 2**30:.2f} GiB")
    assert peak_memory(proc.pid) < MEMORY_BOUND, peak_memory(proc.pid) / 2**30
