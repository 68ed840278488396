"""The VLM-judge reward against a fake OpenAI-compatible server on loopback."""

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from rewardflow.rewards import build_reward
from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.vlm import VLMScoreReward, load_template, parse_final_score


@pytest.fixture
def fake_vlm():
    """A chat-completions server whose "VLM" scores an image by its brightness, 1 + 4 * mean, or misbehaves."""
    seen, servers = [], []

    def start(mode="ok"):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seen.append((self.path, self.headers.get("Authorization"), body))
                if mode == "down":
                    self.send_response(503)
                    self.end_headers()
                    return
                image_part, text_part = body["messages"][0]["content"]
                png = base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])
                brightness = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32).mean() / 255
                text = f"Elements: ... ok.\nFinal Score: {1 + 4 * brightness:.4f}" if mode == "ok" else "I like it."
                answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start, seen
    for s in servers:
        s.shutdown()
        s.server_close()


def test_scores_come_back_in_order_with_the_prompt_in_the_instruction(fake_vlm, monkeypatch):
    start, seen = fake_vlm
    url = start()
    levels = torch.tensor([0.0, 0.5, 1.0, 0.25, 0.75])
    images = levels.view(-1, 1, 1, 1).expand(-1, 3, 8, 8).clone()
    prompts = [f'a sign that says "{i}"' for i in range(5)]
    monkeypatch.setenv("VLM_KEY", "sk-local")
    reward = build_reward(RewardConfig(names=("unifiedreward",), vlm_url=url, vlm_token_env="VLM_KEY"))
    out = reward(images, prompts, [{}] * 5)
    expected = 1 + 4 * (levels * 255).round() / 255
    assert torch.allclose(out.scores, expected, atol=1e-4)
    assert {path for path, _, _ in seen} == {"/v1/chat/completions"}
    assert {auth for _, auth, _ in seen} == {"Bearer sk-local"}
    texts = sorted(body["messages"][0]["content"][1]["text"] for _, _, body in seen)
    assert all(f'"a sign that says "{i}""' in t for i, t in enumerate(texts))
    assert {body["model"] for _, _, body in seen} == {"UnifiedReward-qwen-7b"}


def test_garbage_and_dead_servers_fail_clearly(fake_vlm, tmp_path):
    start, _ = fake_vlm
    image = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="no 'Final Score: <number>': 'I like it.'"):
        VLMScoreReward(start("garbage"), "m")(image, ["x"], [{}])
    with pytest.raises(RuntimeError, match="did not answer after 2 attempts .*HTTP 503.*sglang"):
        VLMScoreReward(start("down"), "m", retries=1, backoff=0.01)(image, ["x"], [{}])
    with pytest.raises(ValueError, match="must contain {prompt}"):
        VLMScoreReward("http://127.0.0.1:1", "m", template="no slot")
    with pytest.raises(FileNotFoundError, match="vlm_template_file"):
        load_template(str(tmp_path / "missing.txt"))
    assert parse_final_score("Final Score: 2\n... Final Score: **4.5**") == 4.5
