"""Stable Diffusion 1.x / 2.x (a variance-preserving UNet) presented as a rectified-flow policy.

The change of variables. A VP model sees ``x_t = a_t x0 + b_t eps`` with ``a_t^2 + b_t^2 = 1``
(``a_t = sqrt(alphas_cumprod[t])``). Dividing by ``a_t + b_t`` gives

    y = x_t / (a_t + b_t) = (1 - s) x0 + s eps,    s = b_t / (a_t + b_t),

a point of the rectified-flow path at ``sigma = s``. So a flow state ``(y, s)`` is the VP state
``x_t = (a + b) y`` at the timestep ``t`` whose noise-to-signal ratio ``b_t / a_t`` is ``r = s / (1 - s)``
(``a = 1 / sqrt(1 + r^2)``, ``b = r a``; ``t`` interpolated in ``log r`` over the training timesteps, so the
UNet is called at a fractional timestep between grid points). The UNet's prediction gives ``x0_hat`` and
``eps_hat`` (from epsilon or v prediction) and the flow velocity is ``v = eps_hat - x0_hat``. An Euler step
of this flow from ``s`` to ``s'`` lands on ``(1 - s') x0_hat + s' eps_hat``, which is exactly DDIM's
deterministic step from ``t`` to ``t'`` divided by ``a' + b'``: DRaFT's DDIM sampler and every method of
this library run on SD 1.x through the same code (tests/test_diffusers_adapters.py checks it against
diffusers' DDIMScheduler).

The noisiest state the UNet knows is ``t = T - 1`` (``s = sigma_max``, about 0.94 for SD 1.x, not 1). The
sampling grid (:meth:`SD1Policy.schedule`) is the sigmas of the timesteps the pipeline's scheduler config gives a
DDIM sampler (50 steps of SD 1.5: 981, 961, ..., 1), ending at 0; samplers start at its first sigma from
``eps / (a + b)``, as the pipelines start from pure noise at their first timestep. DDIM's last step of a config
with ``set_alpha_to_one = False`` (SD 1.5's) lands on ``alphas_cumprod[0]`` (sigma about 0.03), ours on 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rewardflow.models import diffusers_io as dio
from rewardflow.models.protocol import Conditioning, bf16_autocast, guided_velocity
from rewardflow.sampling.schedules import sd3_schedule

# DRaFT's and the diffusers LoRA scripts' targets on the SD UNet: the attention projections.
SD1_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class SD1Policy:
    """An epsilon- (or v-) prediction UNet as a flow policy; see the module docstring for the mapping.

    Args:
        pipe: a ``StableDiffusionPipeline`` whose UNet is the trained network; VAE and text encoder frozen.
        reference: a frozen copy of the UNet for a full fine-tune; None with LoRA (adapters off).
        resolution: image side in pixels.
        negative_prompt: the unconditional prompt for CFG (empty by default, as in the SD pipelines).
        autocast: run the UNet under bfloat16 autocast (float32 weights, or float32 LoRA on bfloat16 ones); step math
            stays float32.
    """

    def __init__(
        self,
        pipe,
        reference: nn.Module | None = None,
        resolution: int = 512,
        negative_prompt: str = "",
        autocast: bool = False,
    ) -> None:
        dio.attach_pipeline(self, pipe, "unet", reference)
        factor = pipe.vae_scale_factor * 2 ** (len(self.module.config.block_out_channels) - 1)
        if resolution % factor:
            raise ValueError(f"resolution {resolution} must be a multiple of {factor} (VAE and UNet downscaling)")
        self.latent_size = resolution // pipe.vae_scale_factor
        self.negative_prompt, self.autocast = negative_prompt, autocast
        self._null: dict[str, torch.Tensor] | None = None
        self.prediction = pipe.scheduler.config.prediction_type
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"scheduler prediction_type {self.prediction!r}: only epsilon and v_prediction are mapped"
            )
        alphas = pipe.scheduler.alphas_cumprod.double()
        self._log_ratio = (0.5 * torch.log((1 - alphas) / alphas)).float()  # log(b_t / a_t), increasing in t
        ratio = torch.exp(self._log_ratio[-1].double())
        self.sigma_max = float(ratio / (1 + ratio))

    device = property(dio.network_device)

    def vp_state(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, a, b)`` for flow sigmas [B]: the (fractional) UNet timestep and the VP coefficients.

        Sigmas above :attr:`sigma_max` are treated as ``sigma_max`` (the noisiest timestep the UNet knows).
        """
        s = sigma.double().clamp(0.0, self.sigma_max)
        ratio = s / (1 - s)
        a = 1 / torch.sqrt(1 + ratio**2)
        log_r = torch.log(ratio.clamp_min(1e-12))
        table = self._log_ratio.double().to(s.device)
        k = torch.searchsorted(table, log_r).clamp(1, len(table) - 1)
        lo, hi = table[k - 1], table[k]
        t = (k - 1) + ((log_r - lo) / (hi - lo)).clamp(0.0, 1.0)
        return t.float(), a.float(), (ratio * a).float()

    def schedule(self, num_steps: int, shift: float = 0.0) -> torch.Tensor:
        """Flow sigmas [num_steps + 1] of the pipeline's DDIM timesteps (its spacing), ending at 0.

        ``shift > 0``: a uniform grid with that fixed shift, scaled to start at :attr:`sigma_max`, instead.
        """
        from diffusers import DDIMScheduler

        if shift:
            return sd3_schedule(num_steps, shift) * self.sigma_max
        ddim = DDIMScheduler.from_config(self.pipe.scheduler.config)
        ddim.set_timesteps(num_steps)
        ratio = torch.exp(self._log_ratio.double()[ddim.timesteps])
        return torch.cat([ratio / (1 + ratio), torch.zeros(1, dtype=torch.float64)]).float()

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"embeds": embeds}

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        return dio.encode_with_negative(self, prompts)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        net = self.weights.active()
        dtype = self.module.dtype

        def forward(y: torch.Tensor, sig: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            t, a, b = (c.view(-1, *[1] * (y.ndim - 1)) for c in self.vp_state(sig))
            x_t = (a + b) * y.float()
            with bf16_autocast(y.device.type, self.autocast):
                out = net(x_t.to(dtype), t.flatten(), encoder_hidden_states=tensors["embeds"].to(dtype))
            out = out.sample.float()
            if self.prediction == "epsilon":
                eps, x0 = out, (x_t - b * out) / a
            else:  # v prediction: v_vp = a eps - b x0
                eps, x0 = a * out + b * x_t, a * x_t - b * out
            return eps - x0

        return guided_velocity(forward, x, sigma, cond, guidance_scale)

    def noise(self, batch: int, generator: torch.Generator | None = None, sigma: float | None = None) -> torch.Tensor:
        """The flow state at ``sigma`` (default :attr:`sigma_max`) for pure VP noise there: ``eps / (a + b)``."""
        shape = (batch, self.module.config.in_channels, self.latent_size, self.latent_size)
        _, a, b = self.vp_state(torch.tensor([self.sigma_max if sigma is None else float(sigma)]))
        return dio.draw_noise(shape, generator, self.device) / (a + b).to(self.device)

    decode = dio.decode_with_vae  # at sigma 0 the flow state is the VP latent itself


SD1_SPEC = dio.ModelSpec(
    pipeline="StableDiffusionPipeline",
    net="unet",
    lora_targets=SD1_LORA_TARGETS,
    example="stable-diffusion-v1-5/stable-diffusion-v1-5",
    native_size=lambda pipe: pipe.unet.config.sample_size * pipe.vae_scale_factor,
)


def load_sd1_policy(path: str | Path, **options) -> SD1Policy:
    """An SD 1.x / 2.x policy from a local diffusers folder, ready to fine-tune (options as for SD3)."""
    return dio.load_diffusers_policy(SD1_SPEC, SD1Policy, path, **options)
