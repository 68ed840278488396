"""The one protocol every model sits behind, and the conditioning it passes around."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from rewardflow.models.weights import PolicyWeights


@dataclass
class Conditioning:
    """Encoded prompts of one batch.

    Attributes:
        prompts: the prompt strings, one per row.
        tensors: the model's conditioning tensors, each with the batch as its first dimension.
        null_tensors: the same for the unconditional (CFG) branch, or empty when the model has none.
    """

    prompts: list[str]
    tensors: dict[str, torch.Tensor]
    null_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def index(self, rows: torch.Tensor | slice) -> Conditioning:
        """The rows ``rows`` (an index tensor or a slice) of this batch."""
        picked = list(range(len(self.prompts)))[rows] if isinstance(rows, slice) else rows.tolist()
        return Conditioning(
            prompts=[self.prompts[i] for i in picked],
            tensors={k: v[rows] for k, v in self.tensors.items()},
            null_tensors={k: v[rows] for k, v in self.null_tensors.items()},
        )


@runtime_checkable
class FlowPolicy(Protocol):
    """A rectified-flow image generator as the algorithms see it.

    ``x`` is the model's latent (pixels for the tiny DiT). ``sigma`` follows the library's convention
    (1 = noise, 0 = data); adapters convert to their model's timestep. Velocities come back in float32.
    """

    module: nn.Module
    """The trained network (the transformer or UNet; its parameters are the ones :meth:`trainable_parameters`
    draws from, and what FSDP shards and an export saves)."""
    weights: PolicyWeights
    """Which weights a forward pass uses (trained, reference, old) and how they are sharded, merged and saved; the
    weight methods below are answered by it."""
    sigma_max: float
    """The noisiest sigma the model knows, where sampling starts from :meth:`noise`: 1 for flow models, less for a
    variance-preserving model seen as a flow (SD 1.x)."""

    @property
    def device(self) -> torch.device:
        """Where the network runs (sampling noise is drawn on the CPU and moved here)."""
        ...

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encode prompts (validating them) for :meth:`velocity`."""
        ...

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """``v(x, sigma)`` [B, ...] in float32; ``guidance_scale != 1`` applies classifier-free guidance."""
        ...

    def schedule(self, num_steps: int, shift: float = 0.0) -> torch.Tensor:
        """The sampling grid [num_steps + 1], float32, from the first sigma down to exactly 0.

        ``shift`` 0: the model's own grid, the sigmas its diffusers pipeline samples on for ``num_steps`` (the
        Shapes world's for the tiny DiT); ``shift > 0``: ``linspace(1, 0, T + 1)`` with that fixed shift, scaled to
        start at :attr:`sigma_max` (DanceGRPO's grid).
        """
        ...

    def noise(self, batch: int, generator: torch.Generator | None = None, sigma: float | None = None) -> torch.Tensor:
        """Initial state ``x`` [batch, ...] for pure noise at ``sigma``, a grid's first value.

        ``sigma`` defaults to :attr:`sigma_max`; a flow model's noise is standard normal (its grids start at 1).
        """
        ...

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] from clean latents."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (LoRA weights, or all weights for a full fine-tune)."""
        ...

    def reference(self) -> AbstractContextManager[None]:
        """Within this context, :meth:`velocity` is the frozen reference policy (adapters off / frozen copy)."""
        ...

    def sampling(self) -> AbstractContextManager[None]:
        """Within this context the policy samples without gradient (rollouts, evaluation).

        With ``model.merge_lora_rollouts`` its LoRA adapter is folded into the base weights meanwhile.
        """
        ...

    def named_trainable_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Name and tensor of every trainable weight (for EMA, checkpoints and the old policy)."""
        ...


@runtime_checkable
class OldPolicy(FlowPolicy, Protocol):
    """A policy that can keep an old (rollout) copy of its trainable weights, lagging behind them.

    Only DiffusionNFT needs it (it checks at start-up); every adapter here offers it through
    :class:`~rewardflow.models.weights.PolicyWeights`.
    """

    def init_old(self) -> None:
        """Create the old policy equal to the current one."""
        ...

    def old(self) -> AbstractContextManager[None]:
        """Within this context, :meth:`velocity` is the old policy."""
        ...

    def named_old_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The old policy's trainable weights, named as in :meth:`named_trainable_state`."""
        ...

    def soft_update_old(self, eta: float) -> None:
        """``theta_old <- eta theta_old + (1 - eta) theta``."""
        ...


def guided_velocity(
    forward: Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    cond: Conditioning,
    guidance_scale: float,
) -> torch.Tensor:
    """``v(x, sigma)`` in float32 from a network call ``forward(x, sigma [B], tensors)``, with CFG when asked.

    The shared part of every adapter's :meth:`FlowPolicy.velocity`: ``sigma`` (a float or [B]) is expanded to
    [B] float32; guidance 1 is one conditional pass; otherwise one batched pass over ``[uncond; cond]``, combined
    as ``v_u + w (v_c - v_u)`` in float32.
    """
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sig = sig.expand(x.shape[0]) if sig.ndim == 0 else sig
    if guidance_scale == 1.0:
        return forward(x, sig, cond.tensors).float()
    both = {k: torch.cat([cond.null_tensors[k], v]) for k, v in cond.tensors.items()}
    v_uncond, v_cond = forward(torch.cat([x, x]), torch.cat([sig, sig]), both).float().chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bfloat16 matmuls natively, so that autocast to it is a speed-up.

    CUDA: yes. A CPU: only with AVX512-BF16 or AMX; elsewhere PyTorch emulates bfloat16 (on a 2-core AVX2 VM a
    2048^2 matmul ran at 0.2 GFLOPS in bfloat16 against 72 in float32, the tiny DiT's forward 9x slower and its
    forward + backward 16x; docs/results.md).
    """
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def bf16_autocast(device_type: str, enabled: bool) -> torch.autocast:
    """bfloat16 autocast for a network's forward where asked for and :func:`native_bf16`, else a no-op."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled and native_bf16(device_type))
