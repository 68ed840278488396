"""The reward server and client on loopback: equal scores, the token, a fuzz of bad requests, a dead server."""

import http.client
import json
import random
import threading

import pytest
import torch

from rewardflow.rewards.image import JpegSize
from rewardflow.rewards.remote import RemoteReward, encode_png
from rewardflow.rewards.server import RewardServer, ServerLimits
from rewardflow.types import RewardOutput

PROMPTS = ["a red circle", "two squares", "a blue triangle"]


def _images(n: int = 3, size: int = 16) -> torch.Tensor:
    """Images on the 8-bit grid, so the PNG round trip is exact."""
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0)).float() / 255


@pytest.fixture
def serve():
    started = []

    def start(reward, token=None, **limits):
        server = RewardServer(reward, port=0, token=token, limits=ServerLimits(**limits)).start()
        started.append(server)
        return server, server.url

    yield start
    for server in started:
        server.stop()


def test_remote_scores_equal_in_process_scores_and_batches(serve):
    reward = JpegSize(sign=-1.0)
    server, url = serve(reward)
    assert server.address[0] == "127.0.0.1"
    images = _images(5)
    prompts = PROMPTS + PROMPTS[:2]
    remote = RemoteReward(url, batch_size=2)  # three requests of 2, 2 and 1 images
    assert torch.equal(remote(images, prompts, [{}] * 5).scores, reward(images, prompts, [{}] * 5).scores.float())


def test_a_request_without_the_token_is_refused(serve):
    _, url = serve(JpegSize(sign=1.0), token="s3cret")
    with pytest.raises(ValueError, match="refused the request \\(401\\)"):
        RemoteReward(url)(_images(1), PROMPTS[:1], [{}])
    assert RemoteReward(url, token="s3cret")(_images(1), PROMPTS[:1], [{}]).scores.shape == (1,)


def _raw(url: str, method: str, path: str, body: bytes | None, headers: dict) -> int:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def test_bad_requests_get_4xx_and_the_server_keeps_serving(serve):
    _, url = serve(JpegSize(sign=1.0), max_images=4, max_bytes=100_000)
    good_image = encode_png(_images(1)[0])
    rng = random.Random(0)

    def bad() -> tuple[str, bytes | None, dict]:
        kind = rng.randrange(9)
        ok = {"prompts": ["a"], "metadata": [{}], "images": [good_image]}
        if kind == 0:  # random bytes
            return "/score", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), {}
        if kind == 1:  # truncated JSON
            text = json.dumps(ok).encode()
            return "/score", text[: rng.randrange(1, len(text) - 1)], {}
        if kind == 2:  # wrong types
            return "/score", json.dumps({"prompts": 3, "images": {"a": 1}}).encode(), {}
        if kind == 3:  # counts that do not match
            return "/score", json.dumps({**ok, "prompts": ["a", "b"]}).encode(), {}
        if kind == 4:  # base64 that is not an image
            return "/score", json.dumps({**ok, "images": ["aGVsbG8gd29ybGQ="]}).encode(), {}
        if kind == 5:  # too many images
            n = 5
            return (
                "/score",
                json.dumps({"prompts": ["a"] * n, "metadata": [{}] * n, "images": [good_image] * n}).encode(),
                {},
            )
        if kind == 6:  # says it is huge
            return "/score", b"{}", {"Content-Length": "999999999"}
        if kind == 7:  # a JSON list
            return "/score", b"[1, 2, 3]", {}
        return "/nowhere", b"{}", {}

    for _ in range(200):
        path, body, headers = bad()
        status = _raw(url, "POST", path, body, headers)
        assert 400 <= status < 500, (path, body[:80] if body else body, status)
    assert _raw(url, "GET", "/health", None, {}) == 200
    assert RemoteReward(url)(_images(2), PROMPTS[:2], [{}, {}]).scores.shape == (2,)


def test_a_dead_or_failing_server_makes_the_client_fail_clearly(serve):
    server, url = serve(JpegSize(sign=1.0))
    server.stop()
    with pytest.raises(RuntimeError, match=r"did not answer after 3 attempts .*serve-reward"):
        RemoteReward(url, retries=2, backoff=0.01, timeout=2)(_images(1), PROMPTS[:1], [{}])

    class Broken:
        name = "broken"

        def __call__(self, images, prompts, metadata):
            raise RuntimeError("model exploded")

    _, url = serve(Broken())
    with pytest.raises(RuntimeError, match="HTTP 500: .*model exploded"):
        RemoteReward(url, retries=1, backoff=0.01)(_images(1), PROMPTS[:1], [{}])

    class Garbage:
        name = "garbage"

        def __call__(self, images, prompts, metadata):
            return RewardOutput(scores=torch.tensor([float("nan")] * len(prompts)))

    _, url = serve(Garbage())
    with pytest.raises(ValueError, match="expected 1 finite scores"):
        RemoteReward(url)(_images(1), PROMPTS[:1], [{}])
    with pytest.raises(ValueError, match="must start with http"):
        RemoteReward("127.0.0.1:1")


def test_a_training_run_whose_reward_server_fails_stops_with_its_last_checkpoint_intact(
    serve, tmp_path, tiny_run_args, capsys
):
    from rewardflow.cli import main
    from rewardflow.utils.checkpoint import load_state

    calls = {"n": 0}

    class FailsFromTheThirdIteration:  # the smoke preset scores two chunks of 4 rollouts per iteration
        name = "flaky"

        def __call__(self, images, prompts, metadata):
            calls["n"] += 1
            if calls["n"] >= 5:
                raise RuntimeError("the reward model fell over")
            return JpegSize(sign=1.0)(images, prompts, metadata)

    server, url = serve(FailsFromTheThirdIteration())
    run = tmp_path / "run"
    args = ["--run-dir", str(run), "--iterations", "3", "--save-every", "1", "--reward.names", "remote",
            "--reward.remote-url", url, *tiny_run_args]  # fmt: skip
    args += ["--reward.remote-retries", "2", "--reward.remote-backoff", "0.01"]  # short waits in a test
    assert main(["train", "shapes_grpo_smoke", *args]) == 1  # one message naming the URL, no traceback
    err = capsys.readouterr().err
    assert f"reward server {url}/score did not answer after 3 attempts" in err and "fell over" in err
    state = load_state(run / "checkpoints" / "state_00002.pt")
    assert state["iteration"] == 2 and (run / "checkpoints" / "iter_00002.safetensors").is_file()

    # The server is killed: the resumed run retries, then stops with the URL in the message, its checkpoint intact.
    server.stop()
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    assert main(["train", "shapes_grpo_smoke", *args, "--resume"]) == 1
    assert "did not answer after 3 attempts" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before

    # A server answers again (a new one on another port): the run finishes.
    _, url = serve(JpegSize(sign=1.0))
    args[args.index("--reward.remote-url") + 1] = url
    assert main(["train", "shapes_grpo_smoke", *args, "--resume"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in rows if "reward" in m] == [1, 2, 3]


def test_serve_reward_command_refuses_unknown_rewards_and_unset_tokens(capsys, monkeypatch):
    from rewardflow.cli import main

    assert main(["serve-reward", "nope"]) == 2
    assert "cannot serve 'nope'; registered rewards: shapes-judge" in capsys.readouterr().err
    monkeypatch.delenv("RF_TOKEN", raising=False)
    assert main(["serve-reward", "jpeg-compressibility", "--token-env", "RF_TOKEN"]) == 2
    assert "'RF_TOKEN', but that environment variable is not set" in capsys.readouterr().err


def test_a_server_that_accepts_and_never_answers_is_logged_while_waiting_then_fails(monkeypatch, caplog):
    import socket

    import rewardflow.rewards.remote as remote

    monkeypatch.setattr(remote, "WAIT_LOG_EVERY", 0.2)
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (the backlog) and never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        with pytest.raises(RuntimeError, match=rf"reward server {url}/score did not answer after 2 attempts"):
            RemoteReward(url, timeout=0.7, retries=1, backoff=0.01)(_images(1), PROMPTS[:1], [{}])
    finally:
        silent.close()
    assert f"still waiting for reward server {url}/score" in caplog.text
    assert "attempt 2 of 2" in caplog.text


def test_one_request_that_makes_the_reward_fail_does_not_fail_the_requests_it_shares_a_call_with(serve):
    class FailsOnPoison:
        name = "picky"

        def __call__(self, images, prompts, metadata):
            if "poison" in prompts:
                raise KeyError("poison")
            return RewardOutput(
                scores=images.mean(dim=(1, 2, 3)), details={"nan": torch.full((len(prompts),), float("nan"))}
            )

    _, url = serve(FailsOnPoison(), concurrency=4)
    results = {}

    def ask(prompt):
        try:
            results[prompt] = RemoteReward(url, retries=0)(_images(1), [prompt], [{}])
        except Exception as e:  # noqa: BLE001 - recorded for the assertion
            results[prompt] = e

    threads = [threading.Thread(target=ask, args=(p,)) for p in ("poison", "a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results["poison"], RuntimeError) and "HTTP 500" in str(results["poison"])
    for p in "abc":
        assert isinstance(results[p], RewardOutput), results[p]
        assert torch.isnan(results[p].details["nan"]).all()  # a non-finite detail travels as null, back as NaN
