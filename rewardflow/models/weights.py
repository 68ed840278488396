"""The trained network and its two companions, shared by every adapter: the reference and the old policy.

A policy holds one :class:`PolicyWeights` and asks it which network to run (:meth:`PolicyWeights.active`).

- LoRA (the module carries peft adapters): the reference policy is the module with its adapters off; DiffusionNFT's
  old (rollout) policy is a second adapter named ``"old"`` on the same layers, so neither costs a second copy of
  the base weights.
- Full fine-tune: the reference is a frozen copy given at construction; the old policy a frozen copy made by
  :meth:`PolicyWeights.init_old`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rewardflow.models.lora import (
    OLD_ADAPTER,
    TRAINED_ADAPTER,
    adapters_disabled,
    add_adapter_copy,
    has_lora,
    merged_adapters,
    use_adapter,
)


class PolicyWeights:
    """Which weights a policy's forward pass uses: the trained ones, the reference, or the old policy.

    Args:
        module: the trained network (with LoRA adapters, or every weight trainable).
        reference: a frozen copy of the base network for a full fine-tune; None with LoRA (adapters off), or for a
            full fine-tune whose algorithm never asks for the reference (no KL term, no velocity penalty), which then
            saves a whole copy of the network.
    """

    def __init__(self, module: nn.Module, reference: nn.Module | None = None) -> None:
        self.module, self._reference = module, reference
        self._lora = has_lora(module)
        self._old: nn.Module | None = None
        self._has_old = False
        self._mode = "trained"
        self._sharded = False
        self.merge_lora = False
        """Whether :meth:`sampling` folds the LoRA adapter into the base weights (``model.merge_lora_rollouts``)."""

    def expose_on(self, policy: object) -> None:
        """Give ``policy`` the FlowPolicy methods that are about weights, answered by this object."""
        policy.trainable_parameters = self.trainable_parameters
        policy.named_trainable_state = self.named_trainable_state
        policy.reference, policy.init_old, policy.old = self.reference, self.init_old, self.old
        policy.named_old_state, policy.soft_update_old = self.named_old_state, self.soft_update_old
        policy.sampling = self.sampling

    def active(self) -> nn.Module:
        """The network to run now (with LoRA the module itself, its active adapter set by the contexts)."""
        if self._mode == "reference" and self._reference is not None:
            return self._reference
        if self._mode == "old" and self._old is not None:
            return self._old
        return self.module

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def named_trainable_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        return ((n, p) for n, p in self.module.named_parameters() if p.requires_grad)

    @contextmanager
    def _in(self, mode: str) -> Iterator[None]:
        if self._mode != "trained":
            raise RuntimeError(f"already running the {self._mode} policy; the contexts do not nest")
        self._mode = mode
        try:
            yield
        finally:
            self._mode = "trained"

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Within the context the active network is the reference policy."""
        if self._reference is None and not self._lora:
            raise ValueError(
                "this full fine-tune was built without a reference copy (its run needs none): the "
                "reference policy is not available"
            )
        with self._in("reference"):
            if self._reference is not None:
                yield
            else:
                with adapters_disabled(self.module):
                    yield

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """Within the context the policy samples without gradient (rollouts, evaluation).

        With :attr:`merge_lora` and LoRA adapters, the active adapter (the trained one, or the old policy's inside
        :meth:`old`) is folded into the base weights for the context (:func:`merged_adapters`): each layer runs
        one matmul instead of three. The merged weights round differently from base + adapter, so a Flow-GRPO
        rollout's stored log-probabilities then differ slightly from their re-computation in training (the
        on-policy ratio is 1 within rounding, not bitwise; ``tests/test_weights.py`` measures it). DiffusionNFT
        keeps only the clean samples, so for it merging costs nothing in exactness.
        """
        with torch.no_grad():
            if self.merge_lora and self._lora and self._mode != "reference":
                with merged_adapters(self.module):
                    yield
            else:
                yield

    def networks(self) -> list[nn.Module]:
        """The trained network, and its frozen reference and old copies where they exist."""
        return [m for m in (self.module, self._reference, self._old) if m is not None]

    def shard(self, bf16: bool = False) -> None:
        """Shard the trained network and its frozen reference and old copies with FSDP2 (``model.fsdp``).

        For a full fine-tune under torchrun; call after :meth:`init_old`. Each rank then holds 1/N of every
        weight, gradient and optimizer state; the forward passes gather the weights block by block.
        """
        from rewardflow.utils.distributed import shard

        if self._lora:
            raise ValueError("model.fsdp shards a full fine-tune; LoRA adapters are small: leave model.fsdp off")
        for module in self.networks():
            shard(module, bf16)
        self._sharded = True

    def init_old(self) -> None:
        """Create the old policy equal to the current one (an ``"old"`` adapter, or a frozen copy)."""
        if self._lora:
            add_adapter_copy(self.module, TRAINED_ADAPTER, OLD_ADAPTER)
        else:
            self._old = copy.deepcopy(self.module).requires_grad_(False).eval()
        self._has_old = True

    @contextmanager
    def old(self) -> Iterator[None]:
        """Within the context the active network is the old policy (see :meth:`init_old`)."""
        if not self._has_old:
            raise RuntimeError("no old policy: call init_old() first")
        with self._in("old"):
            if self._lora:
                with use_adapter(self.module, OLD_ADAPTER, back_to=TRAINED_ADAPTER):
                    yield
            else:
                yield

    def named_old_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The old policy's copies of the trainable weights, by the names of :meth:`named_trainable_state`."""
        if not self._has_old:
            raise RuntimeError("no old policy: call init_old() first")
        if self._lora:
            params = dict(self.module.named_parameters())
            old_name = f".{OLD_ADAPTER}."
            return ((n, params[n.replace(f".{TRAINED_ADAPTER}.", old_name)]) for n, _ in self.named_trainable_state())
        assert self._old is not None
        old = dict(self._old.named_parameters())
        return ((n, old[n]) for n, _ in self.named_trainable_state())

    @torch.no_grad()
    def soft_update_old(self, eta: float) -> None:
        """``theta_old <- eta theta_old + (1 - eta) theta`` on the trainable weights (eta 0 copies theta)."""
        if self._sharded:
            from rewardflow.utils.distributed import reshard

            reshard(self.module, self._old)
        for (_, old), (_, new) in zip(self.named_old_state(), self.named_trainable_state()):
            old.lerp_(new.detach(), 1.0 - eta)
