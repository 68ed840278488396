"""The reward server: any registered reward over HTTP (``rewardflow serve-reward``), on Starlette and uvicorn.

The wire format is :mod:`rewardflow.rewards.remote`'s (JSON with base64 PNG images, never pickle):
``POST /score`` with ``{"prompts", "metadata", "images"}`` answers ``{"scores", "details"}``; ``GET /health``
answers ``{"reward": name, "ok": true}``. A request meets the guards in this order, so that a hostile one costs as
little as possible:

1. the path, then the bearer token, compared in constant time, before any of the body is read (404, 401);
2. the size declared in ``Content-Length`` (411 without one, 413 over ``max_bytes``), before any of it is read;
3. admission: at most ``concurrency`` requests are read, decoded and scored at once and ``queue`` more wait for a
   slot; beyond that the answer is 503 with ``Retry-After`` (the client waits that long and retries);
4. the body, counted while it streams (413 past ``max_bytes``) and due within ``body_timeout`` seconds (408), so a
   slow client cannot hold a slot;
5. the JSON and its fields (400, naming the field); images: PNG only, their width and height read from the PNG
   header and checked against ``max_pixels`` per image and ``max_request_pixels`` per request before anything is
   decoded (413);
6. scoring: the requests in the slots are scored together in shared batches of at most ``batch_images`` images of
   one size (a GPU reward model scores one batch of 64 faster than 8 of 8), one reward call at a time in one
   worker thread (reward models are rarely thread-safe); a reward that raises answers 500 to the requests of that
   batch, and the server goes on.

uvicorn listens with a backlog of ``backlog`` connections and closes idle keep-alive connections after 5 seconds.
Memory is bounded by the slots: while a slot parses its request it holds the body, its parsed strings and their
decoded bytes (up to about 3 x ``max_bytes``), then its images' 8-bit pixels; the one reward call at a time holds at
most ``max_request_pixels`` float32 pixels. So about ``concurrency x (3 x max_bytes + 6 x max_request_pixels) + 15 x
max_request_pixels`` bytes besides the reward model (1.4 GB with the defaults, a bound rarely approached: 64 images of
512 x 512 pixels make a body of about 25 MB); a waiting request holds its headers and what the socket buffered.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from rewardflow.rewards.protocol import RewardFn
from rewardflow.types import RewardOutput
from rewardflow.utils.configs import Count, Natural, Positive, check_fields

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ServerLimits:
    """What one request, and the server as a whole, may cost (``rewardflow serve-reward --help`` shows them)."""

    max_bytes: Count = 64 * 2**20
    """Largest request body in bytes (checked from Content-Length and while the body streams; the client sends at
    most 32 MiB)."""
    max_images: Count = 256
    """Most images in one request (the client sends 64 at a time)."""
    max_pixels: Count = 2048 * 2048
    """Most pixels (width x height) of one image, read from its PNG header before decoding."""
    max_request_pixels: Count = 2**24
    """Most pixels of all the images of one request together, and of one shared reward call (64 images of 512 x 512
    pixels, or 16 of 1024 x 1024; the client splits its batches to fit)."""
    concurrency: Count = 4
    """Requests read, decoded and scored at once (their images may share a reward call)."""
    queue: Natural = 64
    """Requests that may wait for a slot; any more are answered 503 with Retry-After."""
    body_timeout: Positive = 30.0
    """Seconds a client has to send its whole body once it holds a slot (408 after)."""
    batch_images: Natural = 64
    """Most images in one reward call: requests waiting together share calls up to this, a larger request is scored
    in several (0: each request in one call of its own)."""
    retry_after: Count = 1
    """Seconds a 503 answer asks the client to wait."""
    backlog: Count = 2048
    """Connections the operating system queues before the server accepts them."""

    def __post_init__(self) -> None:
        check_fields(self, "limits")


class Refused(Exception):
    """A request the server answers with ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header (its IHDR chunk), without decoding; Refused (400) if it is no PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise Refused(400, "images must be PNG (no other format is decoded)")
    return struct.unpack(">II", data[16:24])


def decode_images(texts: list[str], limits: ServerLimits) -> torch.Tensor:
    """Base64 PNGs -> uint8 images [N, 3, H, W], every size checked from the headers before any is decoded."""
    raw = []
    for i, text in enumerate(texts):
        try:
            raw.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as e:
            raise Refused(400, f"images[{i}] is not base64: {e}") from e
    sizes = [png_size(data) for data in raw]
    for i, (w, h) in enumerate(sizes):
        if not w or not h:
            raise Refused(400, f"images[{i}] is {w} x {h} pixels")
        if w * h > limits.max_pixels:
            raise Refused(413, f"images[{i}] has {w} x {h} pixels; the limit is {limits.max_pixels} per image")
    total = sum(w * h for w, h in sizes)
    if total > limits.max_request_pixels:
        raise Refused(413, f"the request's images have {total} pixels; the limit is {limits.max_request_pixels}")
    if len(set(sizes)) != 1:
        raise Refused(400, "all images of a request must have the same size")
    decoded = []
    for i, data in enumerate(raw):
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                decoded.append(np.asarray(image.convert("RGB")))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise Refused(400, f"images[{i}] is not a readable PNG: {e}") from e
    if len({d.shape for d in decoded}) != 1:  # the headers agreed; the pixels must too
        raise Refused(400, "all images of a request must have the same size")
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)


def parse_request(body: bytes, limits: ServerLimits) -> tuple[torch.Tensor, list[str], list[dict]]:
    """A ``/score`` body -> (uint8 images [N, 3, H, W], prompts, metadata); Refused naming the field otherwise."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, an integer too long to convert, too deep
        raise Refused(400, f"body is not JSON: {e}") from e
    if not isinstance(request, dict):
        raise Refused(400, "body must be a JSON object with prompts, metadata and images")
    prompts, images = request.get("prompts"), request.get("images")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise Refused(400, "prompts must be a list of strings")
    metadata = request.get("metadata") or [{} for _ in prompts]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise Refused(400, "images must be a list of base64 PNG strings")
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise Refused(400, "metadata must be a list of objects")
    if not images or not (len(images) == len(prompts) == len(metadata)):
        raise Refused(400, f"need as many prompts, metadata and images, and at least one: got {len(prompts)}, "
                      f"{len(metadata)}, {len(images)}")  # fmt: skip
    if len(images) > limits.max_images:
        raise Refused(413, f"{len(images)} images in one request; the limit is {limits.max_images}")
    return decode_images(images, limits), prompts, metadata


@dataclass
class _Job:
    images: torch.Tensor
    prompts: list[str]
    metadata: list[dict]
    done: asyncio.Future


class Batcher:
    """Scores the jobs waiting together in shared reward calls, one call at a time in one worker thread."""

    def __init__(self, reward: RewardFn, batch_images: int, batch_pixels: int) -> None:
        self.reward, self.batch_images, self.batch_pixels = reward, batch_images, batch_pixels
        self.jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self.carry: _Job | None = None

    async def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, Any]:
        done = asyncio.get_running_loop().create_future()
        await self.jobs.put(_Job(images, prompts, metadata, done))
        return await done

    async def run(self) -> None:
        """Forever: take the waiting jobs (up to ``batch_images`` images, one image size), score them in one call."""
        loop = asyncio.get_running_loop()
        while True:
            first = self.carry or await self.jobs.get()
            self.carry, batch, n = None, [first], len(first.prompts)
            per_image = first.images[0].numel() // 3
            while self.batch_images and not self.jobs.empty():
                job = self.jobs.get_nowait()
                fits = (
                    n + len(job.prompts) <= self.batch_images
                    and (n + len(job.prompts)) * per_image <= self.batch_pixels
                )
                if not fits or job.images.shape[1:] != first.images.shape[1:]:
                    self.carry = job
                    break
                batch.append(job)
                n += len(job.prompts)
            try:
                answers = await loop.run_in_executor(self.worker, self._score, batch)
            except Exception as e:  # the reward failed on the shared batch: each request alone, so that only the
                # one that makes it fail gets the error (a 500), and the server goes on
                if len(batch) == 1:
                    self._fail(batch[0], e)
                    continue
                answers = []
                for job in batch:
                    try:
                        answers.append((await loop.run_in_executor(self.worker, self._score, [job]))[0])
                    except Exception as alone:  # noqa: BLE001 - that request's own failure, answered as a 500
                        self._fail(job, alone)
                        answers.append(None)
            for job, answer in zip(batch, answers):
                if answer is not None and not job.done.done():  # the client may have gone
                    job.done.set_result(answer)

    def _fail(self, job: _Job, error: Exception) -> None:
        log.error("reward failed: %s: %s", type(error).__name__, error)
        if not job.done.done():
            name = getattr(self.reward, "name", "reward")
            job.done.set_exception(Refused(500, f"reward {name} failed: {type(error).__name__}: {error}"))

    def _score(self, batch: list[_Job]) -> list[dict[str, Any]]:
        images = torch.cat([job.images for job in batch]).float().div_(255.0)
        prompts = [p for job in batch for p in job.prompts]
        metadata = [m for job in batch for m in job.metadata]
        step = self.batch_images or len(prompts)  # a request larger than a batch is scored in several calls
        with torch.no_grad():
            outs = [self.reward(images[i : i + step], prompts[i : i + step], metadata[i : i + step])
                    for i in range(0, len(prompts), step)]  # fmt: skip
        out = RewardOutput.cat(outs) if len(outs) > 1 else outs[0]
        scores = out.scores.detach().float().cpu()
        if scores.shape != (len(prompts),):
            raise ValueError(f"the reward returned {tuple(scores.shape)} scores for {len(prompts)} images")
        details = {k: v.detach().float().cpu() for k, v in out.details.items()
                   if torch.is_tensor(v) and v.shape[:1] == (len(prompts),)}  # fmt: skip
        answers, start = [], 0
        for job in batch:
            rows = slice(start, start + len(job.prompts))
            answers.append({"scores": _json_numbers(scores[rows]),
                            "details": {k: _json_numbers(v[rows]) for k, v in details.items()}})  # fmt: skip
            start = rows.stop
        return answers


def _json_numbers(values: torch.Tensor) -> list[float | None]:
    """A tensor as JSON numbers; NaN and infinity, which JSON lacks, as null (the client refuses them by name)."""
    return [v if np.isfinite(v) else None for v in values.tolist()]


def build_app(reward: RewardFn, token: str | None = None, limits: ServerLimits | None = None) -> Any:
    """The Starlette application serving ``reward`` under ``limits`` (module docstring)."""
    require_server_extra()
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    limits = limits or ServerLimits()
    expected = f"Bearer {token}".encode() if token else None
    state: dict[str, Any] = {"active": 0}

    def refuse(e: Refused) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    def check_token(request: Request) -> None:
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise Refused(401, "missing or wrong bearer token")

    async def read_body(request: Request) -> bytes:
        chunks, size = [], 0
        stream = request.stream().__aiter__()
        deadline = asyncio.get_running_loop().time() + limits.body_timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(left, 0.0))
            except StopAsyncIteration:
                return b"".join(chunks)
            except (asyncio.TimeoutError, TimeoutError) as e:
                raise Refused(408, f"the body did not arrive within {limits.body_timeout:g} s") from e
            size += len(chunk)
            if size > limits.max_bytes:
                raise Refused(413, f"request of more than {limits.max_bytes} bytes; the limit is {limits.max_bytes}")
            chunks.append(chunk)

    async def health(request: Request) -> JSONResponse:
        try:
            check_token(request)
        except Refused as e:
            return refuse(e)
        return JSONResponse({"reward": getattr(reward, "name", "reward"), "ok": True})

    async def score(request: Request) -> JSONResponse:
        try:
            check_token(request)
            declared = request.headers.get("content-length")
            if declared is None or not (declared.isascii() and declared.isdigit()):
                raise Refused(411, "a Content-Length header is required")
            if int(declared) > limits.max_bytes:
                raise Refused(413, f"request of {declared} bytes; the limit is {limits.max_bytes}")
            if state["active"] >= limits.concurrency + limits.queue:
                raise Refused(503, f"{state['active']} requests in progress or waiting; retry later",
                              {"Retry-After": str(limits.retry_after)})  # fmt: skip
        except Refused as e:
            return refuse(e)
        state["active"] += 1
        try:
            async with state["slots"]:
                body = await read_body(request)
                if len(body) != int(declared):
                    raise Refused(400, f"truncated body: {len(body)} of {declared} bytes")
                images, prompts, metadata = await asyncio.to_thread(parse_request, body, limits)
                del body
                return JSONResponse(await state["batcher"].score(images, prompts, metadata))
        except Refused as e:
            return refuse(e)
        except ClientDisconnect:
            return JSONResponse({"error": "client went away"}, status_code=400)
        finally:
            state["active"] -= 1

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        state["slots"] = asyncio.Semaphore(limits.concurrency)
        state["batcher"] = Batcher(reward, limits.batch_images, limits.max_request_pixels)
        task = asyncio.create_task(state["batcher"].run())
        try:
            yield
        finally:
            task.cancel()
            state["batcher"].worker.shutdown(wait=False, cancel_futures=True)

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"no such endpoint {request.url.path!r}; use GET /health or POST /score"},
                            status_code=404)  # fmt: skip

    async def wrong_method(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path}"}, status_code=405)

    routes = [Route("/health", health, methods=["GET"]), Route("/score", score, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: wrong_method})


def require_server_extra() -> None:
    """Raise ValueError with the install command when Starlette or uvicorn is missing (the optional server extra)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"the reward server needs the server extra: pip install 'rewardflow[server]' ({err})"
        ) from err


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RewardServer:
    """A running (or ready) reward server: ``address`` is bound at construction, ``serve_forever`` or ``start``."""

    def __init__(self, reward: RewardFn, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 limits: ServerLimits | None = None) -> None:  # fmt: skip
        require_server_extra()
        import uvicorn

        self.limits = limits or ServerLimits()
        if token is None and not is_loopback(host):
            log.warning(
                "serving on %s without a token: anyone who can reach it can use the reward (--token-env)", host
            )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: an answer's headers and body leave at once, not after the client's
        # delayed ACK (40 ms a request on a kept-alive connection otherwise).
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket.bind((host, port))
        self.socket.listen(self.limits.backlog)
        self.address: tuple[str, int] = self.socket.getsockname()[:2]
        config = uvicorn.Config(build_app(reward, token, self.limits), log_level="warning", timeout_keep_alive=5,
                                backlog=self.limits.backlog, lifespan="on")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serve until Ctrl-C (or :meth:`stop` from another thread)."""
        self.server.run(sockets=[self.socket])

    def start(self) -> RewardServer:
        """Serve in a background thread; returns once the server accepts requests."""
        self.thread = threading.Thread(target=self.serve_forever, name="reward-server", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the reward server stopped while starting (see the log)")
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.socket.close()
