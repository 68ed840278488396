"""The SD3, FLUX and SD 1.x adapters on tiny random pipelines built from config and loaded from disk (no download).

The tests shared by all adapters take the ``adapter`` fixture; the ones about one model's conventions
(SD3's timestep, FLUX's packing, guidance embedding and shift, SD 1.x's change of variables) follow at the end.
"""

import copy
import importlib.util
import json

import pytest
import torch

pytest.importorskip("diffusers")

from rewardflow.algorithms import grpo, nft  # noqa: E402
from rewardflow.algorithms.direct import direct_train_step  # noqa: E402
from rewardflow.algorithms.draft import DraftConfig, draft_loss  # noqa: E402
from rewardflow.algorithms.grpo import GRPOConfig  # noqa: E402
from rewardflow.algorithms.leapalign import LeapAlignConfig, leapalign_loss  # noqa: E402
from rewardflow.algorithms.nft import NFTConfig  # noqa: E402
from rewardflow.data.prompts import load_prompts  # noqa: E402
from rewardflow.models.diffusers_io import load_lora, save_lora  # noqa: E402
from rewardflow.models.flux import load_flux_policy, pack, unpack  # noqa: E402
from rewardflow.models.protocol import Conditioning, FlowPolicy  # noqa: E402
from rewardflow.models.sd1 import load_sd1_policy  # noqa: E402
from rewardflow.models.sd3 import load_sd3_policy  # noqa: E402
from rewardflow.models.tiny_diffusers import save_tiny_flux, save_tiny_sd1, save_tiny_sd3  # noqa: E402
from rewardflow.sampling.rollout import rollout  # noqa: E402
from rewardflow.sampling.schedules import sd3_schedule  # noqa: E402
from tests.conftest import Brightness  # noqa: E402

PROMPTS = ["a red cube", "two dogs on grass"]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "model")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "model")


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory):
    return save_tiny_sd1(tmp_path_factory.mktemp("sd1") / "model")


class Adapter:
    """One adapter's tiny model, and how to sample it our way and the diffusers pipeline's way."""

    def __init__(self, name, folder, load, guidance, embeds_shape, pooled_dim, load_kwargs):
        self.name, self.folder, self._load, self.guidance = name, folder, load, guidance
        self.embeds_shape, self.pooled_dim, self._kwargs = embeds_shape, pooled_dim, load_kwargs

    def load(self, lora: bool = True, **kwargs):
        return self._load(self.folder, **{"lora_rank": 4 if lora else 0, "resolution": 32, **self._kwargs, **kwargs})

    def ours(self, policy, eps: torch.Tensor, steps: int) -> torch.Tensor:
        """Our Euler ODE sample on the model's own grid from pure noise ``eps`` (the state at the grid's first
        sigma: ``eps`` for a flow, ``eps / (a + b)`` for SD 1.x)."""
        sigmas = policy.schedule(steps)
        x_init = eps
        if self.name == "sd1":
            _, a, b = policy.vp_state(sigmas[:1])
            x_init = eps / (a + b)
        return rollout(policy, policy.encode_prompts(PROMPTS), sigmas, torch.zeros(steps),
                       guidance_scale=self.guidance, x_init=x_init).final  # fmt: skip

    def theirs(self, policy, eps: torch.Tensor, steps: int, record: list | None = None, tokens: int | None = 16):
        """The diffusers pipeline's own ``__call__`` from ``eps`` (its scheduler's sigmas; DDIM for SD 1.x).

        ``record``: filled with the sigmas the pipeline's scheduler sampled on. ``tokens``: T5's sequence length
        (None: the pipeline's default, which a policy built from a run's config uses).
        """
        kwargs = dict(guidance_scale=self.guidance, output_type="latent", height=32, width=32,
                      num_inference_steps=steps)  # fmt: skip
        if record is not None:

            def keep(pipe, i, t, tensors):
                if i == 0:
                    record.append(pipe.scheduler.sigmas.clone() if self.name != "sd1" else pipe.scheduler.timesteps)
                return tensors

            kwargs["callback_on_step_end"] = keep
        if self.name == "sd1":
            return policy.pipe(PROMPTS, latents=eps.clone(), **kwargs).images
        if tokens:
            kwargs["max_sequence_length"] = tokens
        if self.name == "sd3":
            return policy.pipe(PROMPTS, latents=eps.clone(), **kwargs).images
        return unpack(policy.pipe(PROMPTS, latents=pack(eps), **kwargs).images, *eps.shape[-2:])


@pytest.fixture(params=["sd3", "flux", "sd1"])
def adapter(request, sd3_dir, flux_dir, sd1_dir):
    if request.param == "sd3":
        return Adapter("sd3", sd3_dir, load_sd3_policy, 4.5, (77 + 16, 64), 64, {"max_sequence_length": 16})
    if request.param == "flux":
        return Adapter("flux", flux_dir, load_flux_policy, 3.5, (16, 64), 32, {"max_sequence_length": 16})
    return Adapter("sd1", sd1_dir, load_sd1_policy, 4.5, (77, 32), None, {})


def _eps(policy, seed: int) -> torch.Tensor:
    return torch.randn(2, *policy.noise(1).shape[1:], generator=torch.Generator().manual_seed(seed))


def test_shapes_dtypes_and_prompt_encoding(adapter):
    policy = adapter.load()
    assert isinstance(policy, FlowPolicy)
    cond = policy.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    # SD3: CLIP tokens then T5's, both CLIPs' projections pooled; FLUX: T5's tokens, one CLIP pooled; SD 1.x: CLIP.
    assert cond.tensors["embeds"].shape == (3, *adapter.embeds_shape)
    if adapter.pooled_dim:
        assert cond.tensors["pooled"].shape == (3, adapter.pooled_dim)
    assert torch.equal(cond.tensors["embeds"][0], cond.tensors["embeds"][2])  # one encoding per distinct prompt
    assert not torch.equal(cond.tensors["embeds"][0], cond.tensors["embeds"][1])
    x = policy.noise(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 4, 16, 16)
    v = policy.velocity(x, torch.tensor([0.9, 0.5, 0.1]), cond, guidance_scale=adapter.guidance)
    assert v.dtype == torch.float32 and v.shape == x.shape and torch.isfinite(v).all()
    images = policy.decode(x)
    assert images.shape == (3, 3, 32, 32) and 0.0 <= images.min() and images.max() <= 1.0
    with pytest.raises(ValueError, match="must be a multiple of"):
        adapter.load(resolution=34)


def test_velocity_is_the_transformer_at_1000_sigma_and_cfg_combines_it(sd3_dir):
    policy = load_sd3_policy(sd3_dir, lora_rank=4, max_sequence_length=16)
    cond = policy.encode_prompts(PROMPTS)
    x, sigma = policy.noise(2, torch.Generator().manual_seed(1)), torch.tensor([0.8, 0.3])

    def raw(tensors):
        return policy.module(
            hidden_states=x, timestep=1000 * sigma, encoder_hidden_states=tensors["embeds"],
            pooled_projections=tensors["pooled"], return_dict=False,
        )[0]  # fmt: skip

    v_c, v_u = raw(cond.tensors), raw(cond.null_tensors)
    assert torch.allclose(policy.velocity(x, sigma, cond, guidance_scale=1.0), v_c, atol=1e-6)
    guided = policy.velocity(x, sigma, cond, guidance_scale=4.5)
    assert torch.allclose(guided, v_u + 4.5 * (v_c - v_u), atol=1e-5)
    unconditional = Conditioning(cond.prompts, cond.null_tensors, cond.null_tensors)
    assert torch.allclose(policy.velocity(x, sigma, unconditional, guidance_scale=4.5), v_u, atol=1e-5)


@pytest.mark.parametrize("steps", [4, 6])
def test_our_euler_ode_sample_equals_the_diffusers_pipeline(adapter, steps):
    """Same initial noise, with guidance: our rollout on the model's own grid and the pipeline's ``__call__`` agree.

    SD3 and FLUX: the pipeline's Euler sampler on its scheduler's sigmas. SD 1.x: the pipeline's DDIM sampler, which
    our Euler steps reproduce through the change of variables (rewardflow/models/sd1.py).
    """
    policy = adapter.load()
    eps = _eps(policy, 2)
    ours, theirs = adapter.ours(policy, eps, steps), adapter.theirs(policy, eps, steps)
    assert (ours - eps).abs().mean() > 0.1  # the sample moved
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("steps", [6, 10, 28, 40])
def test_the_model_grid_is_the_sigmas_its_pipeline_samples_on(adapter, steps):
    """``policy.schedule(T)`` equals the sigmas the pipeline's ``__call__`` gave its scheduler for T steps (SD 1.x:
    the flow sigmas of its DDIM timesteps), recorded from inside the call."""
    policy = adapter.load()
    record: list = []
    adapter.theirs(policy, _eps(policy, 0), steps, record)
    ours = policy.schedule(steps)
    if adapter.name == "sd1":
        theirs = policy.vp_state(ours[:-1])[0]
        assert torch.allclose(theirs, record[0].float(), atol=1e-3) and ours[-1] == 0
        # The flow sigma of each DDIM timestep, b / (a + b) from the scheduler's alphas_cumprod, to 1e-6.
        alphas = policy.pipe.scheduler.alphas_cumprod.double()[record[0].long()]
        a, b = alphas.sqrt(), (1 - alphas).sqrt()
        assert torch.allclose(ours[:-1].double(), b / (a + b), atol=1e-6)
        # The noise the samplers start from is the pipeline's pure noise at that first timestep, divided by a + b.
        _, a, b = policy.vp_state(ours[:1])
        noise = policy.noise(2, torch.Generator().manual_seed(7), float(ours[0]))
        assert torch.allclose(noise, _eps(policy, 7) / (a + b), atol=1e-6) and ours[0] < policy.sigma_max
    else:
        assert ours.shape == record[0].shape and torch.allclose(ours, record[0].float(), atol=1e-6)
    fixed = policy.schedule(steps, 3.0)  # a fixed shift instead: DanceGRPO's grid on any model
    assert torch.allclose(fixed / fixed[0], sd3_schedule(steps, 3.0), atol=1e-6)


def test_on_policy_ratio_is_exactly_one_through_the_adapter(adapter):
    policy = adapter.load()
    cfg = GRPOConfig(num_steps=3, micro_batch=2, optimizer_steps=1, guidance_scale=adapter.guidance)
    batch = grpo.collect(policy, policy.encode_prompts(PROMPTS * 2), cfg, torch.Generator().manual_seed(0))
    for start in (0, 2):
        for j in batch.trained_steps:
            out, kl = grpo.step_terms(policy, batch, slice(start, start + 2), j, cfg, need_reference=True)
            log_prob = out.log_prob
            assert torch.equal(log_prob, batch.log_probs[start : start + 2, j])
            assert torch.equal(kl, torch.zeros(2))


def test_merged_lora_rollouts_sample_the_adapter_and_keep_the_ratio_within_rounding(adapter):
    policy = adapter.load()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))  # lora_B starts at zero: give the adapter something to merge
    base, _ = _base_and_trainable(policy)
    cfg = GRPOConfig(num_steps=3, micro_batch=2, optimizer_steps=1, guidance_scale=adapter.guidance)
    cond = policy.encode_prompts(PROMPTS * 2)
    plain = grpo.collect(policy, cond, cfg, torch.Generator().manual_seed(0))
    policy.weights.merge_lora = True
    merged = grpo.collect(policy, cond, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(merged.xs, plain.xs, atol=1e-4)  # the same samples, rounded differently
    for j in merged.trained_steps:  # re-scored by the unmerged network in training: ratio 1 within rounding
        out, _ = grpo.step_terms(policy, merged, slice(0, 2), j, cfg, need_reference=False)
        log_prob = out.log_prob
        assert torch.allclose(log_prob.exp() / merged.log_probs[:2, j].exp(), torch.ones(2), atol=1e-4)
    policy.init_old()
    nft_cfg = NFTConfig(num_steps=3, micro_batch=2)
    x0 = nft.collect(policy, cond, nft_cfg, torch.Generator().manual_seed(1)).x0
    policy.weights.merge_lora = False
    assert torch.allclose(x0, nft.collect(policy, cond, nft_cfg, torch.Generator().manual_seed(1)).x0, atol=1e-4)
    state = policy.module.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in base.items())  # merging never touched the base weights


def _base_and_trainable(policy):
    state = policy.module.state_dict()
    trainable = {n for n, _ in policy.named_trainable_state()}
    return {k: v.clone() for k, v in state.items() if k not in trainable}, {
        n: t.detach().clone() for n, t in policy.named_trainable_state()
    }


@pytest.mark.parametrize("algorithm", ["grpo", "nft", "draft", "leapalign"])
@pytest.mark.parametrize("lora", [True, False])
def test_one_training_step_of_every_algorithm_moves_only_the_trainable_weights(adapter, algorithm, lora):
    policy = adapter.load(lora=lora)
    frozen_parts = {name: copy.deepcopy(getattr(policy.pipe, name).state_dict()) for name in ("vae", "text_encoder")}
    base, trainable = _base_and_trainable(policy)
    if lora:
        assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    cond = policy.encode_prompts(PROMPTS * 2)
    gen = torch.Generator().manual_seed(0)
    if algorithm == "grpo":
        cfg = GRPOConfig(num_steps=3, micro_batch=2, optimizer_steps=2, guidance_scale=adapter.guidance, kl_beta=0.04)
        grpo.train_step(policy, opt, grpo.collect(policy, cond, cfg, gen), torch.tensor([1.0, -1.0, 0.5, -0.5]), cfg)
    elif algorithm == "nft":
        policy.init_old()
        cfg = NFTConfig(num_steps=3, micro_batch=2, optimizer_steps=1)
        nft.train_step(policy, opt, nft.collect(policy, cond, cfg, gen), torch.tensor([1.0, 0.0, 0.7, 0.2]), cfg)
        old = dict(policy.named_old_state())
        assert all(torch.equal(old[n], t) for n, t in trainable.items())  # the old policy did not move
    else:
        if algorithm == "draft":
            cfg = DraftConfig(num_steps=3, micro_batch=2, k=2)
            loss_fn = draft_loss(Brightness(), cfg)
        else:
            cfg = LeapAlignConfig(num_steps=3, micro_batch=2)
            loss_fn = leapalign_loss(Brightness(), cfg)
        direct_train_step(policy, opt, cond, [{}] * 4, loss_fn, cfg, generator=gen)
    state = policy.module.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in base.items())
    assert any(not torch.equal(t, state[n]) for n, t in trainable.items())
    for name, before in frozen_parts.items():
        after = getattr(policy.pipe, name).state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items()), name
    if not lora:  # the reference copy stayed where it started
        with policy.reference():
            ref = policy.weights.active().state_dict()
        assert all(torch.equal(t, ref[n]) for n, t in trainable.items())


def test_saved_lora_loads_in_a_plain_diffusers_pipeline_and_changes_its_output(adapter, tmp_path):
    policy = adapter.load()
    with torch.no_grad():
        for n, p in policy.module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_lora(policy, tmp_path / "lora")
    plain = adapter.load(lora=False)  # a fresh pipeline from the same folder, without our adapters
    eps = _eps(policy, 3)
    before = adapter.theirs(plain, eps, 3)
    plain.pipe.load_lora_weights(tmp_path / "lora")
    after = adapter.theirs(plain, eps, 3)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(adapter.ours(policy, eps, 3), after, atol=1e-4)  # the pipeline samples what we trained
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_lora(adapter.load(lora=False), tmp_path / "full")
    again = adapter.load()  # a fresh policy (new random A) takes the saved adapter back exactly
    load_lora(again, tmp_path / "lora")
    assert torch.equal(adapter.ours(again, eps, 3), adapter.ours(policy, eps, 3))
    with pytest.raises(ValueError, match=r"does not fit this policy's adapters .*has shape .*another lora_rank"):
        load_lora(adapter.load(lora_rank=2), tmp_path / "lora")


def test_missing_or_wrong_model_folders_say_what_to_do(tmp_path):
    from rewardflow.models.config import ModelConfig

    with pytest.raises(ValueError, match="model.kind 'sd3' needs model.path"):
        ModelConfig(kind="sd3")
    with pytest.raises(ValueError, match="model.kind must be 'tiny-dit', 'sd3', 'flux' or 'sd1', got 'sdxl'"):
        ModelConfig(kind="sdxl", path="x")
    with pytest.raises(ValueError, match="model.compile is implemented for the tiny DiT only, not model.kind 'sd3'"):
        ModelConfig(kind="sd3", path="x", compile=True)
    with pytest.raises(FileNotFoundError, match="hf download stabilityai/stable-diffusion-3.5-medium"):
        load_sd3_policy(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="hf download black-forest-labs/FLUX.1-dev"):
        load_flux_policy(tmp_path / "nowhere")
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="holds a FluxPipeline, but this model kind needs a StableDiffusion3Pipeline"):
        load_sd3_policy(other)


def test_flux_packing_round_trips_and_matches_the_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(unpack(pack(x), 6, 8), x)
    assert torch.equal(pack(x), FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    with pytest.raises(ValueError, match="even height and width"):
        pack(torch.randn(1, 4, 5, 8))


def test_flux_guidance_is_embedded_for_a_distilled_model_and_true_cfg_otherwise(flux_dir, tmp_path):
    policy = load_flux_policy(flux_dir, lora_rank=2, resolution=32, max_sequence_length=16)
    cond = policy.encode_prompts(PROMPTS)
    assert policy.guidance == "embedded" and cond.null_tensors == {}
    x = policy.noise(2, torch.Generator().manual_seed(4))
    assert not torch.allclose(policy.velocity(x, 0.5, cond, 1.0), policy.velocity(x, 0.5, cond, 3.5), atol=1e-5)
    plain = load_flux_policy(save_tiny_flux(tmp_path / "cfg", guidance_embeds=False), lora_rank=2, resolution=32,
                             max_sequence_length=16)  # fmt: skip
    assert plain.guidance == "cfg"
    cond = plain.encode_prompts(PROMPTS)
    v_c = plain.velocity(x, 0.5, cond, 1.0)
    v_u = plain.velocity(x, 0.5, Conditioning(cond.prompts, cond.null_tensors, cond.null_tensors), 1.0)
    assert torch.allclose(plain.velocity(x, 0.5, cond, 3.5), v_u + 3.5 * (v_c - v_u), atol=1e-5)
    with pytest.raises(ValueError, match="guidance-distilled"):
        load_flux_policy(tmp_path / "cfg", lora_rank=2, resolution=32, guidance="embedded")


def test_sd1_flow_coordinates_hit_the_training_timesteps(sd1_dir):
    policy = load_sd1_policy(sd1_dir, lora_rank=2, resolution=32)
    alphas = policy.pipe.scheduler.alphas_cumprod.double()
    k = torch.tensor([0, 1, 250, 751, 999])
    a, b = alphas[k].sqrt(), (1 - alphas[k]).sqrt()
    t, a_ours, b_ours = policy.vp_state((b / (a + b)).float())
    assert torch.allclose(t, k.float(), atol=1e-3)
    assert torch.allclose(a_ours.double(), a, atol=1e-6) and torch.allclose(b_ours.double(), b, atol=1e-6)
    assert policy.sigma_max == pytest.approx(float(b[-1] / (a[-1] + b[-1])))
    t_top, _, _ = policy.vp_state(torch.tensor([1.0]))  # above sigma_max: the noisiest timestep
    assert t_top.item() == pytest.approx(999.0)
    ddim_t = torch.tensor([751.0, 501.0, 251.0, 1.0])  # DDIM with 4 steps, "leading" spacing, offset 1
    assert torch.allclose(policy.vp_state(policy.schedule(4)[:-1])[0], ddim_t, atol=1e-3)
    assert policy.schedule(4)[-1] == 0.0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd1_euler_step_is_the_ddim_step(sd1_dir, prediction):
    """One Euler step of the flow, mapped back, equals diffusers' DDIM step (eta 0) with CFG."""
    from diffusers import DDIMScheduler

    from rewardflow.models.sd1 import SD1Policy

    base = load_sd1_policy(sd1_dir, lora_rank=2, resolution=32)
    pipe = base.pipe
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction)
    policy = SD1Policy(pipe, resolution=32)
    ddim = pipe.scheduler
    ddim.set_timesteps(5)
    sigmas = policy.schedule(5)
    cond = policy.encode_prompts(PROMPTS)
    x_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    for i in (0, 2, 4):  # the first, a middle and the last step (to clean latents)
        t = ddim.timesteps[i]
        out = pipe.unet(torch.cat([x_t, x_t]), t, encoder_hidden_states=torch.cat(
            [cond.null_tensors["embeds"], cond.tensors["embeds"]])).sample  # fmt: skip
        out_u, out_c = out.chunk(2)
        theirs = ddim.step(out_u + 4.5 * (out_c - out_u), t, x_t).prev_sample
        _, a, b = policy.vp_state(sigmas[i : i + 2])
        y = x_t / (a[0] + b[0])
        y_next = y + (sigmas[i + 1] - sigmas[i]) * policy.velocity(y, sigmas[i], cond, guidance_scale=4.5)
        assert torch.allclose(y_next * (a[1] + b[1]), theirs, atol=1e-4), (
            i,
            (y_next * (a[1] + b[1]) - theirs).abs().max(),
        )


@pytest.mark.parametrize("kind", ["sd3", "flux", "sd1"])
def test_train_and_eval_commands_run_a_diffusers_model_on_free_prompts(kind, sd3_dir, flux_dir, sd1_dir, tmp_path):
    from rewardflow.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\ntwo dogs on grass\na lighthouse at dusk\n")
    run = tmp_path / "run"
    folder = {"sd3": sd3_dir, "flux": flux_dir, "sd1": sd1_dir}[kind]
    args = ["--run-dir", str(run), "--model.kind", kind, "--model.path", str(folder),
            "--model.resolution", "32", "--model.lora-rank", "4", "--train-prompts", str(prompts),
            "--balance-prompts-by", "", "--reward.names", "jpeg-compressibility", "--eval.prompts", str(prompts),
            "--eval.no-judge", "--eval.rewards", "jpeg-compressibility", "--eval.num-steps", "2",
            "--eval.samples-per-prompt", "1"]  # fmt: skip
    assert main(["train", "shapes_grpo_smoke", *args]) == 0
    report = json.loads((run / "eval" / "iter_00002.json").read_text())
    assert "overall" not in report and report["rewards"]["jpeg-compressibility"] < 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in rows if "reward" in m]) == 2
    assert main(["eval", "--run-dir", str(run), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["rewards"] == report["rewards"]  # same EMA weights
    wrong = tmp_path / "wrong"
    args[args.index("--run-dir") + 1] = str(wrong)
    args[args.index("--model.path") + 1] = str(flux_dir if kind != "flux" else sd3_dir)
    assert main(["train", "shapes_grpo_smoke", *args]) == 2
    assert not wrong.exists()


def test_paper_presets_name_what_they_need_and_run_on_tiny_stand_ins(sd3_dir, flux_dir, tmp_path, monkeypatch, capsys):
    from rewardflow.cli import main
    from rewardflow.models.tiny_diffusers import save_tiny_clip

    monkeypatch.chdir(tmp_path)
    cpu = ["--model.device", "cpu", "--reward.device", "cpu"]
    for preset in ("sd35m_pickscore_flow_grpo", "sd35m_pickscore_nft"):
        assert main(["train", preset, *cpu]) == 2  # the prompt files are the first thing it looks for
        assert "data/pickscore/train.txt" in capsys.readouterr().err
    (tmp_path / "data" / "pickscore").mkdir(parents=True)
    for split in ("train", "test"):
        (tmp_path / "data" / "pickscore" / f"{split}.txt").write_text("a red cube\ntwo dogs on grass\n")
    assert main(["train", "sd35m_pickscore_flow_grpo", *cpu]) == 2
    assert "hf download stabilityai/stable-diffusion-3.5-medium" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    small = [*cpu, "--model.resolution", "32", "--model.dtype", "float32", "--iterations", "1",
             "--prompts-per-iter", "2", "--group-size", "2", "--eval.num-steps", "2",
             "--reward.pickscore-model", str(save_tiny_clip(tmp_path / "clip")), "--grpo.micro-batch", "2",
             "--nft.micro-batch", "2", "--grpo.num-steps", "3", "--nft.num-steps", "3"]  # fmt: skip
    assert main(["train", "sd35m_pickscore_flow_grpo", "--model.path", str(flux_dir), *small]) == 2  # wrong kind
    assert "holds a FluxPipeline, but this model kind needs a StableDiffusion3Pipeline" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    for preset in ("sd35m_pickscore_flow_grpo", "sd35m_pickscore_nft"):
        assert main(["train", preset, *small, "--model.path", str(sd3_dir)]) == 0
        report = json.loads((tmp_path / "runs" / preset / "eval" / "iter_00001.json").read_text())
        assert set(report["rewards"]) == {"pickscore"}
    if importlib.util.find_spec("rapidocr"):  # the OCR preset needs only the model folder: its prompts ship
        # Evaluated on two of the shipped evaluation prompts: OCR reads about 4 images a second here, and the
        # whole set (64 prompts, before and after) took 32 of the test's 45 seconds.
        two = tmp_path / "ocr_eval_two.txt"
        two.write_text("".join(f"{r.prompt}\n" for r in load_prompts("ocr:eval")[:2]))
        ocr = [*small, "--model.path", str(sd3_dir), "--eval.prompts", str(two)]
        assert main(["train", "sd35m_ocr_flow_grpo", *ocr]) == 0
        report = json.loads((tmp_path / "runs" / "sd35m_ocr_flow_grpo" / "eval" / "iter_00001.json").read_text())
        assert 0.0 <= report["rewards"]["ocr"] <= 1.0


def test_the_sd15_draft_lv_preset_runs_on_tiny_stand_ins(sd1_dir, tmp_path, monkeypatch):
    from rewardflow.cli import main
    from rewardflow.models.tiny_diffusers import save_tiny_clip

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "aesthetic").mkdir(parents=True)
    (tmp_path / "data" / "aesthetic" / "train.txt").write_text("a photo of a cat\na photo of a dog\n")
    args = ["--model.device", "cpu", "--reward.device", "cpu", "--model.path", str(sd1_dir), "--model.resolution",
            "32", "--model.dtype", "float32", "--iterations", "1", "--draft.num-steps", "3", "--eval.num-steps", "2",
            "--reward.aesthetic-model", str(save_tiny_clip(tmp_path / "clip"))]  # fmt: skip
    assert main(["train", "sd15_aesthetic_draft_lv", *args]) == 0
    report = json.loads((tmp_path / "runs" / "sd15_aesthetic_draft_lv" / "eval" / "iter_00001.json").read_text())
    assert set(report["rewards"]) == {"aesthetic"}


def test_the_geneval_and_flux_hps_presets_run_on_tiny_stand_ins(sd3_dir, flux_dir, tmp_path, monkeypatch):

    from rewardflow.cli import main
    from rewardflow.models.tiny_diffusers import save_tiny_clip
    from rewardflow.rewards.geneval import GenEvalReward, ShapesDetector
    from rewardflow.rewards.server import RewardServer

    monkeypatch.chdir(tmp_path)
    cpu = ["--model.device", "cpu", "--reward.device", "cpu", "--model.resolution", "32", "--model.dtype", "float32",
           "--iterations", "1", "--prompts-per-iter", "2", "--group-size", "2", "--eval.num-steps", "2"]  # fmt: skip
    # GenEval: its metadata in the prompt files, scored by a GenEval server (here with the Shapes detector).
    (tmp_path / "data" / "geneval").mkdir(parents=True)
    line = {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    for split in ("train", "test"):
        (tmp_path / "data" / "geneval" / f"{split}_metadata.jsonl").write_text(json.dumps(line) + "\n")
    server = RewardServer(GenEvalReward(ShapesDetector())).start()
    url = server.url
    try:
        args = [*cpu, "--model.path", str(sd3_dir), "--reward.remote-url", url, "--grpo.micro-batch", "2",
                "--grpo.num-steps", "3", "--eval.samples-per-prompt", "1"]  # fmt: skip
        assert main(["train", "sd35m_geneval_flow_grpo", *args]) == 0
    finally:
        server.stop()
    report = json.loads((tmp_path / "runs" / "sd35m_geneval_flow_grpo" / "eval" / "iter_00001.json").read_text())
    assert report["rewards"] == {"remote": 0.0}  # no cat in a tiny random model's image
    # FLUX + HPS (a CLIP folder is what the HPS loader reads), DanceGRPO and LeapAlign.
    (tmp_path / "data" / "hpdv2").mkdir(parents=True)
    for split in ("train", "test"):
        (tmp_path / "data" / "hpdv2" / f"{split}.txt").write_text("a red cube\ntwo dogs on grass\n")
    hps = ["--reward.hps-model", str(save_tiny_clip(tmp_path / "hps")), "--model.path", str(flux_dir)]
    dance = ["--grpo.micro-batch", "2", "--grpo.num-steps", "3"]
    leap = ["--leapalign.micro-batch", "2", "--leapalign.num-steps", "3"]
    for preset, extra in (("flux_hps_dance_grpo", dance), ("flux_hps_leapalign", leap)):
        assert main(["train", preset, *cpu, *hps, *extra]) == 0
        report = json.loads((tmp_path / "runs" / preset / "eval" / "iter_00001.json").read_text())
        assert set(report["rewards"]) == {"hps"}


def test_a_hub_id_resolves_offline_from_the_cache_and_a_missing_one_says_what_to_do(sd3_dir, tmp_path, monkeypatch):
    """``model.path`` and a reward's model path take a Hub id, found in a prepared Hub cache with HF_HUB_OFFLINE=1."""
    import shutil

    from huggingface_hub import constants

    from rewardflow.models.tiny_diffusers import save_tiny_clip
    from rewardflow.rewards.clip import ClipScoreReward
    from rewardflow.utils.hub import model_folder

    cache = tmp_path / "hub"
    for repo, folder in (("someone/tiny-sd3", sd3_dir), ("someone/tiny-clip", save_tiny_clip(tmp_path / "clip"))):
        entry = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(folder, entry / "snapshots" / ("c" * 40))
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text("c" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    policy = load_sd3_policy("someone/tiny-sd3", lora_rank=2, resolution=32, max_sequence_length=16)
    plain = load_sd3_policy(sd3_dir, lora_rank=2, resolution=32, max_sequence_length=16)
    assert torch.equal(next(iter(policy.pipe.vae.parameters())), next(iter(plain.pipe.vae.parameters())))
    assert ClipScoreReward("someone/tiny-clip").model.config.projection_dim > 0
    assert model_folder(sd3_dir, "model.path") == sd3_dir  # a local folder is itself
    with pytest.raises(FileNotFoundError, match=r"model.path 'someone/missing' is neither a local folder nor a Hub "
                       r"model .*offline mode.*`hf download someone/missing`"):  # fmt: skip
        load_sd3_policy("someone/missing", lora_rank=2)


class _Plain:
    """A plain diffusers pipeline in the place ``Adapter.theirs`` looks for one."""

    def __init__(self, pipe):
        self.pipe = pipe


@pytest.mark.parametrize("lora", [True, False])
def test_a_runs_export_loads_in_a_plain_pipeline_and_samples_the_trained_policy(adapter, lora, tmp_path):
    """Train, then ``rewardflow export``: the exported LoRA (or network) in a plain diffusers pipeline samples what
    the trained policy samples from the same noise, and not what the base samples; the run's own ``diffusers/``
    export at its last save is the same weights."""
    import diffusers

    from rewardflow.build import load_trained_policy
    from rewardflow.cli import main
    from rewardflow.export import PIPELINES

    if not lora and adapter.name != "sd3":
        pytest.skip("the full fine-tune export is the same code for every kind; sd3 stands for all")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run = tmp_path / "run"
    args = ["train", "shapes_grpo_smoke", "--run-dir", str(run), "--model.kind", adapter.name, "--model.path",
            str(adapter.folder), "--model.resolution", "32", "--model.lora-rank", "4" if lora else "0",
            "--train-prompts", str(prompts), "--balance-prompts-by", "", "--reward.names", "jpeg-compressibility",
            "--eval.prompts", str(prompts), "--eval.no-judge", "--eval.rewards", "jpeg-compressibility",
            "--eval.num-steps", "2", "--eval.samples-per-prompt", "1", "--optim.lr", "0.05",
            "--grpo.clip-range", "10", "--model.no-autocast"]  # fmt: skip
    assert main(args) == 0
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "shapes_grpo_smoke" in card and "grpo" in card and str(adapter.folder) in card
    policy, _ = load_trained_policy(run)
    pipe = getattr(diffusers, PIPELINES[adapter.name]).from_pretrained(adapter.folder)
    pipe.set_progress_bar_config(disable=True)
    base = adapter.theirs(_Plain(pipe), _eps(policy, 3), 4, tokens=None)
    if lora:
        pipe.load_lora_weights(out)
    else:
        pipe.transformer = type(pipe.transformer).from_pretrained(out / "transformer")
    theirs = adapter.theirs(_Plain(pipe), _eps(policy, 3), 4, tokens=None)
    ours = adapter.ours(policy, _eps(policy, 3), 4)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert (theirs - base).abs().max() > 1e-3  # the export carries the training
    weights = sorted(p.name for p in (run / "diffusers").rglob("*.safetensors"))
    assert weights == sorted(p.name for p in out.rglob("*.safetensors"))
    with pytest.raises(FileExistsError, match="is not empty"):
        from rewardflow.export import export_run

        export_run(run, out)
    with pytest.raises(FileNotFoundError, match=r"saved no weights at iteration 7; saved: \[1, 2\]"):
        export_run(run, tmp_path / "other", iteration=7)
    assert not (tmp_path / "other").exists()
