"""Reward server under load: requests/s and latency at 1, 8 and 64 concurrent clients on loopback.

Both servers run in this process on 127.0.0.1 and score the same requests (8 PNG images of 64 x 64 pixels each):
``rewardflow.rewards.server.RewardServer`` (Starlette and uvicorn) and, for comparison, the standard library's
threading server that served rewards before it, loaded from git history (``--baseline-rev``). Two rewards:
``jpeg-compressibility`` (CPU work per image, no gain from larger batches) and ``fixed-cost``, which sleeps 20 ms per
call plus 0.1 ms per image, the shape of a GPU reward model whose calls cost about the same whatever the batch (the
case shared batches are for). Each client sends its next request as soon as the previous one is answered, for
``--seconds`` per setting; 503 answers (the new server's queue is full) are counted and retried by the client.

    python benchmarks/server_load.py --seconds 5 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib.util
import io
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewardflow.rewards.image import JpegSize
from rewardflow.rewards.server import RewardServer, ServerLimits
from rewardflow.types import RewardOutput

BASELINE_REV = "7298207"  # the last commit whose rewardflow/rewards/remote.py held the threading server


class FixedCost:
    """20 ms per call plus 0.1 ms per image, whatever the images: a stand-in for a GPU model's call."""

    name = "fixed-cost"

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        time.sleep(0.020 + 0.0001 * len(prompts))
        return RewardOutput(scores=images.mean(dim=(1, 2, 3)))


def request_body(n: int = 8, size: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(base64.b64encode(buffer.getvalue()).decode())
    return json.dumps({"prompts": ["a red circle"] * n, "metadata": [{}] * n, "images": images}).encode()


def baseline_server(rev: str):
    """``make_server`` of the threading server at ``rev``, imported from ``git show``."""
    source = subprocess.run(["git", "show", f"{rev}:rewardflow/rewards/remote.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parent).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "baseline_remote.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_remote", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_server


def load(port: int, body: bytes, clients: int, seconds: float) -> dict:
    """``clients`` threads posting ``body`` back to back for ``seconds``; answered requests/s and latency."""
    latencies: list[float] = []
    counts = {"ok": 0, "busy": 0, "failed": 0}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < stop:
            t0 = time.monotonic()
            try:
                conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                status = 0
            with lock:
                if status == 200:
                    counts["ok"] += 1
                    latencies.append(time.monotonic() - t0)
                elif status == 503:
                    counts["busy"] += 1
                else:
                    counts["failed"] += 1
            if status == 503:
                time.sleep(0.05)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"requests_per_s": counts["ok"] / elapsed, "p50_ms": 1000 * float(np.percentile(lat, 50)),
            "p99_ms": 1000 * float(np.percentile(lat, 99)), **counts}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--out", default="", help="folder for server_load.json")
    args = parser.parse_args()
    body = request_body()
    make_baseline = baseline_server(args.baseline_rev)
    rows = []
    for reward in (JpegSize(sign=-1.0), FixedCost()):
        for server_name in ("asgi", "threading"):
            if server_name == "asgi":
                server = RewardServer(reward, limits=ServerLimits(concurrency=8, queue=128)).start()
                port, close = server.address[1], server.stop
            else:
                old = make_baseline(reward, port=0)
                threading.Thread(target=old.serve_forever, daemon=True).start()
                port = old.server_address[1]

                def close(old=old) -> None:
                    old.shutdown()
                    old.server_close()

            try:
                for clients in args.clients:
                    row = {"reward": reward.name, "server": server_name, "clients": clients,
                           **load(port, body, clients, args.seconds)}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                close()
    print("\n| reward | clients | ASGI req/s | ASGI p99 ms | threading req/s | threading p99 ms |")
    print("|---|---|---|---|---|---|")
    for reward in ("jpeg-compressibility", "fixed-cost"):
        for clients in args.clients:
            new, old = (next(r for r in rows if r["reward"] == reward and r["server"] == s and r["clients"] == clients)
                        for s in ("asgi", "threading"))  # fmt: skip
            print(f"| {reward} | {clients} | {new['requests_per_s']:.1f} | {new['p99_ms']:.0f} | "
                  f"{old['requests_per_s']:.1f} | {old['p99_ms']:.0f} |")  # fmt: skip
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        meta = {"machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
                "seconds": args.seconds}  # fmt: skip
        (Path(args.out) / "server_load.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
