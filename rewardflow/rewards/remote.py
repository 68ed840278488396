"""``RemoteReward``: a reward scored by a ``rewardflow serve-reward`` server, as a plain RewardFn.

Heavy reward models (a detector for GenEval, a VLM judge) live in their own process or machine. The protocol is
JSON with PNG images, never pickle:

- ``POST /score`` with ``{"prompts": [str], "metadata": [dict], "images": [base64 PNG]}`` answers
  ``{"scores": [float], "details": {name: [float]}}``;
- ``GET /health`` answers ``{"reward": name, "ok": true}``.

The server is :mod:`rewardflow.rewards.server`. The client sends batches of at most ``batch_size`` images and
``max_pixels`` pixels; retries connection failures, timeouts and 5xx answers ``retries`` times, waiting ``backoff``
seconds and doubling (or as long as a 503's ``Retry-After`` asks); logs each failed attempt and, every 30 seconds,
a request still unanswered; and fails with one message naming the URL when the server stays down, keeps failing or
answers garbage. A 4xx answer fails at once (retrying would not help).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import torch
from PIL import Image

from rewardflow.types import RewardOutput
from rewardflow.utils.errors import RunFailed

log = logging.getLogger(__name__)


def encode_png(image: torch.Tensor) -> str:
    """One [3, H, W] image in [0, 1] as base64 PNG (8 bits per channel)."""
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def post_json(
    url: str,
    payload: dict[str, Any],
    token: str | None,
    timeout: float,
    retries: int,
    backoff: float,
    hint: str,
) -> Any:
    """POST ``payload`` as JSON and return the decoded answer.

    Connection failures, timeouts and 5xx answers are retried ``retries`` times, waiting ``backoff`` seconds
    and doubling; a 4xx answer or a body that is not JSON fails at once (retrying would not help).
    """
    data = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    failure, wait = "", 0.0
    for attempt in range(retries + 1):
        if attempt:
            log.warning("reward server %s: %s; attempt %d of %d in %.1f s", url, failure, attempt + 1, retries + 1,
                        wait)  # fmt: skip
            time.sleep(wait)
        wait = backoff * 2**attempt
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with _still_waiting(url), urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            if e.code < 500 and e.code not in (408, 429):  # our request is wrong: retrying will not help
                raise ValueError(f"reward server {url} refused the request ({e.code}): {detail}") from e
            failure = f"HTTP {e.code}: {detail}"
            retry_after = e.headers.get("Retry-After", "") if e.headers else ""
            if e.code in (429, 503) and retry_after.isdigit():  # busy: wait as long as it asks
                wait = max(wait, float(retry_after))
        except json.JSONDecodeError as e:
            raise ValueError(f"reward server {url} answered something that is not JSON: {e}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException) as e:
            failure = str(getattr(e, "reason", e))
    raise RunFailed(f"reward server {url} did not answer after {retries + 1} attempts (last: {failure}); {hint}")


WAIT_LOG_EVERY = 30.0
"""Seconds between the log lines of a request still unanswered."""


class _still_waiting:  # noqa: N801 (used as a context manager, like a function)
    """Logs every :data:`WAIT_LOG_EVERY` seconds while a request to ``url`` is unanswered (a server that stalls)."""

    def __init__(self, url: str) -> None:
        self.url, self.every, self.done = url, WAIT_LOG_EVERY, threading.Event()

    def _watch(self) -> None:
        start = time.monotonic()
        while not self.done.wait(self.every):
            log.warning("still waiting for reward server %s (%.0f s)", self.url, time.monotonic() - start)

    def __enter__(self) -> None:
        threading.Thread(target=self._watch, name="reward-wait", daemon=True).start()

    def __exit__(self, *exc: Any) -> None:
        self.done.set()


class RemoteReward:
    """A reward scored by a ``rewardflow serve-reward`` server (:mod:`rewardflow.rewards.server`).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:18085``.
        name: the reward's name in logs.
        token: bearer token, if the server wants one.
        timeout: seconds per request.
        retries: further attempts after a connection failure, a timeout or a 5xx answer.
        backoff: seconds before the first retry, doubling each time.
        batch_size: most images per request.
        max_pixels: most pixels per request (the server's ``max_request_pixels``): large images go in smaller batches.
        max_bytes: most bytes of base64 PNG per request (the server takes bodies up to 64 MiB by default).
    """

    differentiable = False

    def __init__(
        self,
        url: str,
        name: str = "remote",
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        batch_size: int = 64,
        max_pixels: int = 2**24,
        max_bytes: int = 24 * 2**20,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward server URL must start with http:// or https://, got {url!r}")
        self.url, self.name, self.token = url.rstrip("/"), name, token
        self.timeout, self.retries, self.backoff, self.batch_size = timeout, retries, backoff, batch_size
        self.max_pixels, self.max_bytes = max_pixels, max_bytes

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        return post_json(f"{self.url}/score", payload, self.token, self.timeout, self.retries, self.backoff,
                         hint="is `rewardflow serve-reward` running there?")  # fmt: skip

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        scores: list[float] = []
        details: dict[str, list[float]] = {}
        batch = max(1, min(self.batch_size, self.max_pixels // max(1, images.shape[-1] * images.shape[-2])))
        requests, current, size = [], [], 0
        for i in range(len(prompts)):  # at most ``batch`` images and ``max_bytes`` of PNG a request
            encoded = encode_png(images[i])
            if current and (len(current) == batch or size + len(encoded) > self.max_bytes):
                requests.append(current)
                current, size = [], 0
            current.append((i, encoded))
            size += len(encoded)
        requests.append(current)
        for part in requests:
            start, end = part[0][0], part[-1][0] + 1
            answer = self._post(
                {
                    "prompts": prompts[start:end],
                    "metadata": [dict(m) for m in metadata[start:end]],
                    "images": [encoded for _, encoded in part],
                }
            )
            got = answer.get("scores") if isinstance(answer, dict) else None
            n = len(prompts[start:end])
            if (
                not isinstance(got, list)
                or len(got) != n
                or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in got)
            ):
                raise ValueError(
                    f"reward server {self.url} answered {str(answer)[:200]!r}: expected {n} finite scores"
                )
            scores += [float(s) for s in got]
            for k, v in (answer.get("details") or {}).items():  # null (a non-finite number) as NaN
                details.setdefault(k, []).extend(float("nan") if x is None else x for x in v)
        return RewardOutput(
            scores=torch.tensor(scores, dtype=torch.float32),
            details={k: torch.tensor(v) for k, v in details.items() if len(v) == len(scores)},
        )
