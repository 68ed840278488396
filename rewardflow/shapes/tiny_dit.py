"""The in-house tiny DiT: a pixel-space, text-conditioned rectified-flow model for the Shapes world.

Design (all sizes from :class:`TinyDiTConfig`):

- a word-level tokenizer over the Shapes vocabulary (id 0 is padding; the empty prompt is the CFG null
  prompt) and a small pre-LN transformer text encoder;
- 32x32x3 images cut into 4x4 patches (64 image tokens) with fixed 2-D sine-cosine positions;
- DiT blocks with adaLN-zero modulation from the noise level (and, if ``pooled_prompt``, the mean of the encoded
  prompt tokens), attending jointly over [prompt tokens; image tokens];
- output: the velocity ``v = eps - x0`` at ``x_sigma = (1 - sigma) x0 + sigma eps``.

:class:`TinyDiTPolicy` puts it behind the :class:`~rewardflow.models.protocol.FlowPolicy` protocol.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewardflow.models.protocol import Conditioning, bf16_autocast, guided_velocity
from rewardflow.models.weights import PolicyWeights
from rewardflow.sampling.schedules import SHAPES_SHIFT, sd3_schedule
from rewardflow.shapes.grammar import VOCABULARY, PromptError, normalize
from rewardflow.utils.configs import Count, Positive, check_fields


@dataclass(frozen=True)
class TinyDiTConfig:
    """Architecture of the tiny DiT (stored next to its weights)."""

    image_size: Count = 32
    """Image side in pixels."""
    patch_size: Count = 4
    """Pixels per patch side (the image is (32 / 4)^2 = 64 tokens)."""
    channels: Count = 3
    """Colour channels."""
    dim: Count = 128
    """Width of every block."""
    depth: Count = 6
    """Transformer blocks of the image stream."""
    heads: Count = 4
    """Attention heads."""
    mlp_ratio: Positive = 4.0
    """MLP width over ``dim``."""
    text_depth: Count = 2
    """Transformer blocks of the prompt encoder."""
    max_prompt_tokens: Count = 12
    """Prompt tokens (longer prompts are refused by the tokenizer)."""
    vocabulary: tuple[str, ...] = VOCABULARY
    pooled_prompt: bool = True
    """Add the pooled prompt (mean of the encoded tokens) to the adaLN conditioning of every image token. The pooled
    base (shipped before the current one) had it, and it handed every object of a prompt the same shape signal
    (docs/pretraining.md, "The pooled prompt decides the shapes and the count"); without it (the shipped base) the
    prompt reaches the image only through attention."""
    mask_padding: bool = False
    """Hide the prompt's padding tokens (id 0 after the first position) from every attention, text encoder and
    DiT blocks alike, so that a two-word prompt is not diluted by ten padding keys. The first position always
    stays visible: the null prompt (all padding) is one token. The shipped base has it; without it (the pooled base)
    the padding tokens are attended like words. It has no weights, so a second
    stage of pretraining (``--init``) may switch it on."""

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be a multiple of heads {self.heads}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TinyDiTConfig:
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"tiny DiT config has unknown fields {unknown}; allowed: {sorted(known)}")
        raw["vocabulary"] = tuple(raw.get("vocabulary", VOCABULARY))
        return cls(**raw)


class ShapesTokenizer:
    """Word-level tokenizer of the Shapes vocabulary; pads to a fixed length with id 0."""

    def __init__(self, vocabulary: tuple[str, ...], max_tokens: int) -> None:
        self.ids = {w: i + 1 for i, w in enumerate(vocabulary)}
        self.max_tokens = max_tokens

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, max_tokens] (int64)."""
        out = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = normalize(prompt).split()
            if len(words) > self.max_tokens:
                raise PromptError(
                    f"prompt {prompt!r} has {len(words)} words; the tiny DiT reads at most {self.max_tokens}"
                )
            for col, word in enumerate(words):
                if word not in self.ids:
                    raise PromptError(
                        f"prompt {prompt!r}: word {word!r} is not in the Shapes vocabulary ({', '.join(self.ids)})"
                    )
                out[row, col] = self.ids[word]
        return out


def _sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    args = positions.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _pos_embed_2d(grid: int, dim: int) -> torch.Tensor:
    coords = torch.arange(grid, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([_sincos(ys.reshape(-1), dim // 2), _sincos(xs.reshape(-1), dim // 2)], dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(d) + key_bias) v`` over [B, heads, N, d], the softmax in float32.

    ``key_bias`` [B, 1, 1, N] (float32, 0 or -inf) hides keys; None attends to all of them.

    Written out instead of ``F.scaled_dot_product_attention``: at this model's 76 tokens PyTorch's fused CPU
    kernel spends longer in its backward than the rest of the network together, and a training step takes
    2.2x as long with it (``python benchmarks/tiny_dit_speed.py``; docs/results.md). Rollout and training call
    this same function, so the on-policy ratio stays bitwise 1.
    """
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if key_bias is not None:
        scores = scores + key_bias
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head self-attention (:func:`attend`)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = attend(q, k, v, key_bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer feed-forward block with tanh-approximated GELU."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class TextBlock(nn.Module):
    """Pre-LN transformer block of the prompt encoder."""

    def __init__(self, dim: int, heads: int, ratio: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, ratio)

    def forward(self, h: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), key_bias)
        return h + self.mlp(self.norm2(h))


class DiTBlock(nn.Module):
    """Joint-attention block with adaLN-zero: the gates start at zero so each block starts as identity."""

    def __init__(self, dim: int, heads: int, ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, ratio)
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c))[:, None].chunk(6, dim=-1)
        h = h + gate1 * self.attn(self.norm1(h) * (1 + scale1) + shift1, key_bias)
        return h + gate2 * self.mlp(self.norm2(h) * (1 + scale2) + shift2)


class TinyDiT(nn.Module):
    """Velocity network ``v(x, sigma, tokens)`` for 32x32 RGB images in [-1, 1]."""

    def __init__(self, config: TinyDiTConfig) -> None:
        super().__init__()
        self.config = config
        d, p = config.dim, config.patch_size
        self.grid = config.image_size // p
        self.token_embed = nn.Embedding(len(config.vocabulary) + 1, d)
        # Word positions start at the token embeddings' scale (nn.Embedding draws N(0, 1)). At std 0.02 they were
        # 1/50 of each token's vector and stayed ~1/30 through pretraining, so the pooled base read a prompt almost
        # as a bag of words: "a circle left of a square" and "a square
        # left of a circle" gave nearly the same images, and its position direction and colour binding stayed near
        # chance (docs/pretraining.md, "Word order").
        self.text_pos = nn.Parameter(torch.randn(1, config.max_prompt_tokens, d))
        self.text_blocks = nn.ModuleList(
            TextBlock(d, config.heads, config.mlp_ratio) for _ in range(config.text_depth)
        )
        self.text_norm = nn.LayerNorm(d)
        self.pooled_proj = nn.Linear(d, d) if config.pooled_prompt else None
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.patch_embed = nn.Linear(config.channels * p * p, d)
        self.register_buffer("image_pos", _pos_embed_2d(self.grid, d)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(d, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(d, 2 * d)
        self.final_linear = nn.Linear(d, config.channels * p * p)
        for layer in (self.final_modulation, self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def padding_bias(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Key bias [B, 1, 1, L] that hides the padding after the first position (``mask_padding``), else None."""
        if not self.config.mask_padding:
            return None
        hidden = tokens == 0
        hidden[:, 0] = False
        zero = torch.zeros((), dtype=torch.float32, device=tokens.device)
        return torch.where(hidden, float("-inf"), zero)[:, None, None, :]

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt tokens [B, L, D] and a pooled vector [B, D] (mean over non-padding tokens)."""
        h = self.token_embed(tokens) + self.text_pos[:, : tokens.shape[1]]
        bias = self.padding_bias(tokens)
        for block in self.text_blocks:
            h = block(h, bias)
        h = self.text_norm(h)
        mask = (tokens != 0).to(h.dtype)[..., None]
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return h, pooled

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Velocity [B, 3, H, W] for images ``x`` [B, 3, H, W], noise levels ``sigma`` [B] and tokens [B, L]."""
        b, ch, _, _ = x.shape
        p, g = self.config.patch_size, self.grid
        text, pooled = self.encode_text(tokens)
        c = self.time_mlp(_sincos(sigma * 1000.0, self.config.dim).to(x.dtype))
        if self.pooled_proj is not None:
            c = c + self.pooled_proj(pooled)
        patches = x.reshape(b, ch, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch * p * p)
        h = torch.cat([text, self.patch_embed(patches) + self.image_pos], dim=1)
        bias = self.padding_bias(tokens)
        if bias is not None:  # image tokens are always keys
            bias = F.pad(bias, (0, g * g))
        for block in self.blocks:
            h = block(h, c, bias)
        h = h[:, text.shape[1] :]
        shift, scale = self.final_modulation(F.silu(c))[:, None].chunk(2, dim=-1)
        out = self.final_linear(self.final_norm(h) * (1 + scale) + shift)
        return out.reshape(b, g, g, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, g * p, g * p)


def save_tiny_dit(model: TinyDiT, path: str | Path, **metadata: str) -> None:
    """Write weights and config to one safetensors file (atomically: a temp file, then a rename)."""
    from rewardflow.utils.checkpoint import save_safetensors_atomic

    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_safetensors_atomic(
        state, path, {"format": "rewardflow-tiny-dit", "config": model.config.to_json(), **metadata}
    )


def load_tiny_dit(path: str | Path) -> TinyDiT:
    """Build a tiny DiT from a checkpoint written by :func:`save_tiny_dit`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable tiny-DiT checkpoint, or its tensors do not fit its config.
    """
    from rewardflow.utils.checkpoint import POLICY_FORMAT, load_safetensors_checked

    try:
        state, meta = load_safetensors_checked(path, expected_format="rewardflow-tiny-dit")
    except ValueError as err:
        if f"format {POLICY_FORMAT!r}" in str(err):
            raise ValueError(f"{err}; it is a training-run checkpoint: evaluate it with --run-dir") from err
        raise
    if "config" not in meta:
        raise ValueError(f"checkpoint {path} has no 'config' entry in its metadata; was it written by save_tiny_dit?")
    model = TinyDiT(TinyDiTConfig.from_json(meta["config"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path} does not match its own config: {err}") from err
    return model


class TinyDiTPolicy:
    """The tiny DiT behind :class:`~rewardflow.models.protocol.FlowPolicy`.

    Args:
        model: the network (LoRA adapters may be injected by :mod:`rewardflow.models.lora`).
        reference: a frozen copy used as the reference policy for a full fine-tune; with LoRA leave it None
            and the reference is the model with adapters disabled.
        autocast: run the network under bfloat16 autocast where the hardware has native bfloat16 (1.2-1.7x
            faster on an AVX512-BF16 CPU; ignored on CPUs without it, where it is slower); the step math
            outside the network stays float32 either way.

    Set :attr:`compile` to run the networks through ``torch.compile`` (``model.compile``; check
    :func:`compile_unavailable` first).
    """

    sigma_max = 1.0  # a flow model: sampling starts from pure noise

    def __init__(self, model: TinyDiT, reference: TinyDiT | None = None, autocast: bool = False) -> None:
        self.module = model
        self.tokenizer = ShapesTokenizer(model.config.vocabulary, model.config.max_prompt_tokens)
        self.weights = PolicyWeights(model, reference)
        self.autocast = autocast
        self.weights.expose_on(self)  # trainable / reference / old weights: rewardflow.models.weights
        self.compile = False
        self._compiled: dict[int, nn.Module] = {}  # id(network) -> its compiled wrapper

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        tokens = self.tokenizer(prompts).to(self.device)
        return Conditioning(list(prompts), {"tokens": tokens}, {"tokens": torch.zeros_like(tokens)})

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        net = self.weights.active()
        run = self._compiled_net(net) if self.compile else net
        # Compiled, a network has one graph for calls with gradient and another for calls without, and the two round
        # differently; so a network with trained weights always runs the graph with gradient (the output detached
        # when none is wanted), and a rollout's log-probabilities equal their re-computation in training bitwise.
        grad_graph = self.compile and not torch.is_grad_enabled() and any(p.requires_grad for p in net.parameters())

        def forward(x: torch.Tensor, sig: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            grad = grad_graph or torch.is_grad_enabled()
            with bf16_autocast(x.device.type, self.autocast), torch.set_grad_enabled(grad):
                out = run(x, sig, tensors["tokens"])
            return out.detach() if grad_graph else out

        return guided_velocity(forward, x, sigma, cond, guidance_scale)

    def _compiled_net(self, net: nn.Module) -> nn.Module:
        if id(net) not in self._compiled:
            self._compiled[id(net)] = torch.compile(net)
        return self._compiled[id(net)]

    def schedule(self, num_steps: int, shift: float = 0.0) -> torch.Tensor:
        """The Shapes world's grid: uniform, shifted by ``shift`` (0: :data:`SHAPES_SHIFT`, 3, as pretrained)."""
        return sd3_schedule(num_steps, shift or SHAPES_SHIFT)

    def noise(self, batch: int, generator: torch.Generator | None = None, sigma: float | None = None) -> torch.Tensor:
        c = self.module.config
        gen_device = generator.device if generator is not None else self.device
        shape = (batch, c.channels, c.image_size, c.image_size)
        return torch.randn(shape, generator=generator, device=gen_device).to(self.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


@functools.cache
def compile_unavailable() -> str:
    """Why ``torch.compile`` cannot build code on this machine (it needs a C++ compiler on a CPU), or "" if it can.

    Compiles and runs a one-line function once per process (a few seconds the first time on a machine).
    """
    try:
        torch.compile(lambda t: t * 2.0 + 1.0)(torch.ones(4))
    except Exception as err:  # noqa: BLE001 - whatever stops the compiler, the answer is to run eagerly
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return ""


BASE_CHECKPOINT = "base"
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


def resolve_checkpoint(checkpoint: str) -> Path:
    """``"base"`` is the shipped Shapes base model; anything else is a path."""
    if checkpoint == BASE_CHECKPOINT:
        from importlib import resources

        return Path(str(resources.files("rewardflow") / "assets" / "tiny_dit_shapes.safetensors"))
    return Path(checkpoint)


def load_policy(
    checkpoint: str = BASE_CHECKPOINT,
    lora_rank: int = 0,
    lora_alpha: float = 0.0,
    autocast: bool = False,
    device: str | torch.device = "cpu",
) -> TinyDiTPolicy:
    """The tiny-DiT policy from a checkpoint on ``device``, ready to fine-tune.

    ``lora_rank > 0`` injects LoRA adapters (alpha defaults to 2 * rank) and the reference policy is the
    model with adapters off; ``lora_rank == 0`` trains every weight against a frozen reference copy.
    """
    model = load_tiny_dit(resolve_checkpoint(checkpoint)).to(device)
    if lora_rank > 0:
        from rewardflow.models.lora import add_lora

        add_lora(model, lora_rank, lora_alpha or 2.0 * lora_rank, list(LORA_TARGETS))
        return TinyDiTPolicy(model, reference=None, autocast=autocast)
    reference = load_tiny_dit(resolve_checkpoint(checkpoint)).requires_grad_(False).eval().to(device)
    return TinyDiTPolicy(model, reference=reference, autocast=autocast)
