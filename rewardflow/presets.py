"""Named, complete training configurations. Each function returns a fresh TrainConfig."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable

from rewardflow.algorithms.draft import DraftConfig
from rewardflow.algorithms.grpo import GRPOConfig
from rewardflow.algorithms.leapalign import LeapAlignConfig
from rewardflow.algorithms.nft import NFTConfig
from rewardflow.config import OptimConfig, TrainConfig
from rewardflow.evaluate import EvalConfig
from rewardflow.models.config import ModelConfig
from rewardflow.rewards.config import RewardConfig


def shapes_recipe() -> TrainConfig:
    """The recipe the Shapes presets share: Flow-GRPO with GRPO-Guard on a 10-step sampler, 72 iterations.

    Not a preset itself: the demo (and through it the long ``shapes_grpo``) and the other Shapes presets (the GRPO
    family, DiffusionNFT, the direct methods) change it where they differ and were measured so.
    Full fine-tune at lr 5e-5: the prototype found that the papers' LoRA rate (3e-4) destroys a full
    fine-tune of a tiny model and 2e-4 degrades it; here 1e-4 lost 2-6 points within 25 iterations
    (docs/results.md at 7635c1f). 16 prompts x 8 images per iteration, CFG 4.5, 10 rollout steps (9 trained), clip
    1e-4, code-form KL with beta 0.04 and 2 optimizer steps per iteration, as in the paper's GenEval run.
    Three changes, all measured (docs/results.md at 7635c1f): noise level a = 1.0 (the pixel-space model learned
    faster than with the paper's 0.7); training prompts drawn category-balanced like the evaluation set
    instead of by their share of the file (39% position); and GRPO-Guard's objective (``grpo.guard``: the
    re-centred ratio with a ``1 / dt`` weight per step), which gained +5.3 to +5.8 strict points in 72
    iterations over three seeds against +0.4 to +5.1 for the plain ratio (bf16 autocast on an AMX CPU).
    ``--grpo.no-guard`` is the paper's objective. Runs without the KL term peaked within 30-60 iterations and
    then collapsed onto one colour.
    """
    return TrainConfig(
        run_dir="runs/shapes_recipe",
        iterations=72,
        prompts_per_iter=16,
        group_size=8,
        balance_prompts_by="category",
        save_every=24,
        # Flow-GRPO folds the EMA in every 8 optimizer steps over thousands of steps; a run of a few hundred
        # steps needs every step, or the evaluated weights lag far behind the trained ones.
        ema_every=1,
        model=ModelConfig(checkpoint="base", lora_rank=0, autocast=True),
        optim=OptimConfig(lr=5e-5),
        grpo=GRPOConfig(micro_batch=32, optimizer_steps=2, kl_beta=0.04, noise_level=1.0, guard=True),
        eval=EvalConfig(samples_per_prompt=4),
    )


def shapes_grpo_cpu() -> TrainConfig:
    """Flow-GRPO on the shipped Shapes base, sized for 2 CPU cores and 20 minutes (the README demo).

    :func:`shapes_recipe` with three changes that make an iteration about twice as cheap, so that 150 iterations fit
    where the recipe's 72 did: a 6-step training sampler (5 trained steps; evaluation keeps 40 ODE steps), the KL term
    in one of every 4 training forwards weighted by 4 (``grpo.kl_every``: a quarter of the reference's forwards), and
    the network through ``torch.compile`` (eager where it cannot build code). Measured in docs/results.md at 7635c1f
    ("Six steps, a quarter of the KL forwards, compiled"). The evaluated EMA caps its decay at 0.97 instead of 0.9, so
    it averages the last ~30 optimizer steps instead of ~10: the training is the same, and over six paired evaluations
    of three seeds' trainings it scored +0.7 strict and +1.3 clean points on average (docs/results.md at 7635c1f, "A
    uniform 6-step training grid, and a longer EMA"). The KL weight is five times the recipe's (beta 0.2): on the
    pooled base (the one shipped before the current base; docs/pretraining.md) five runs gained +7.9 to +11.9 strict
    points (mean +10.1) in 150 iterations, where beta 0.04 gained a mean +8.3; the palette still drifts towards white.
    On the shipped base (no pooled prompt, padding hidden) one run gained +25.6 strict / +27.4 clean in 19.0 minutes
    (docs/results.md). Between the base's evaluation and the last, every 30 iterations, it evaluates 1 prompt in 6 of
    the set (30 of 180, each with its noise of the full set), so that the report draws curves; those evaluations
    change nothing in training.
    """
    cfg = shapes_recipe()
    cfg.run_dir = "runs/shapes_grpo_cpu"
    cfg.iterations, cfg.save_every, cfg.ema_decay = 150, 50, 0.97
    cfg.eval_every, cfg.eval.subset_every = 30, 6
    cfg.model.compile = True
    cfg.grpo.num_steps, cfg.grpo.kl_every, cfg.grpo.kl_beta = 6, 4, 0.2
    return cfg


def shapes_grpo() -> TrainConfig:
    """The long Flow-GRPO run: shapes_grpo_cpu's recipe for 450 iterations, on a GPU if there is one.

    Three times the demo's length and nothing else changed (GRPO-Guard, the 6-step training sampler, KL beta 0.2 in one
    of every 4 forwards, the compiled network, the EMA capped at 0.97), evaluated every 50 iterations on every prompt
    (a GPU makes a whole evaluation cheap). On the shipped
    base, 2 CPU cores, seed 0: 0.528 -> 0.806 strict (+27.8 points), 0.486 -> 0.786 clean (+30.0) in 53 minutes of
    training (about 7 s an iteration), above +20 at every evaluation from iteration 150 and at its peak, +31.5, at 300
    (docs/results.md at 7635c1f, "The long preset is the demo's recipe, three times as long"). On a GPU it runs
    compiled in bf16 too; ``tests/test_gpu.py`` has a compiled case of the ratio test, not yet run on a GPU. The
    10-step recipe with the plain ratio for 600 iterations, tried on this base for comparison, flattened at +14 strict
    points from iteration 30 to 90.
    """
    cfg = shapes_grpo_cpu()
    cfg.run_dir = "runs/shapes_grpo"
    cfg.iterations, cfg.eval_every, cfg.eval.subset_every = 450, 50, 0
    cfg.model.device = "auto"
    return cfg


def shapes_nft_cpu() -> TrainConfig:
    """DiffusionNFT on the shipped Shapes base, sized for 2 CPU cores and 20 minutes; CFG-free throughout.

    The paper's GenEval recipe scaled down: 2nd-order DPM-Solver rollouts of 10 steps from the old policy, 9 of the 10
    grid sigmas trained per image, NFT beta 1, velocity penalty 1e-4 to the base, one optimizer step per iteration, EMA
    for evaluation. Evaluated without CFG, as the paper does (the base scores lower without it; docs/results.md
    compares against the base with CFG too). Full fine-tune at lr 1.5e-4 (5e-5, Flow-GRPO's stable rate, learned about
    as fast over 40 iterations; docs/results.md at 7635c1f); the old policy's schedule is 10x faster than the paper's,
    which assumes ~1k optimizer steps.
    """
    cfg = shapes_recipe()
    cfg.run_dir = "runs/shapes_nft_cpu"
    cfg.algorithm = "nft"
    cfg.iterations = 90
    cfg.save_every = 30
    cfg.optim = OptimConfig(lr=1.5e-4)
    cfg.nft = NFTConfig(micro_batch=32, optimizer_steps=1, old_decay_rate=0.01, old_decay_max=0.5)
    cfg.eval = EvalConfig(samples_per_prompt=4, guidance_scale=1.0)
    return cfg


def shapes_grpo_fast_cpu() -> TrainConfig:
    """Flow-GRPO-Fast: shapes_recipe with SDE noise only in a random window of 2 steps.

    The window starts in the first half of the 9 SDE steps (the official ``sde_window_range`` of ``(0, T/2)``
    with a window of 2); every other step is an ODE step and only the window's 2 steps are trained, so an
    iteration trains 2 instead of 9 steps per image. Everything else as ``shapes_recipe``, but with the plain
    Flow-GRPO ratio, as the side-by-side study measured it (``--grpo.guard`` turns GRPO-Guard on).
    """
    cfg = shapes_recipe()
    cfg.run_dir = "runs/shapes_grpo_fast_cpu"
    cfg.grpo.guard = False
    cfg.grpo.sde_window = 2
    cfg.grpo.sde_window_range = (0, 5)
    return cfg


def shapes_dance_cpu() -> TrainConfig:
    """DanceGRPO: the constant-noise SDE, one initial noise per group, a random 60% of steps per image.

    DanceGRPO's image settings scaled down: ``g = eta`` constant, shared initial noise within each group (the
    SDE noise differs), ``timestep_fraction`` 0.6 (5 of the 9 SDE steps per image), clip 1e-4. Two changes,
    both to keep it comparable with ``shapes_recipe``: eta 0.7 (MixGRPO's value for the same step; the FLUX
    scripts use 0.3, and on this pixel-space model more noise learned faster for Flow-GRPO), and the code-form
    KL with beta 0.04 (DanceGRPO has none; without it our Flow-GRPO runs collapsed after 30-60 iterations).
    No best-of-N selection (DanceGRPO uses it for video only); ``grpo.best_worst_k`` turns it on. The plain
    ratio (no GRPO-Guard), as in DanceGRPO and the side-by-side study.
    """
    cfg = shapes_recipe()
    cfg.run_dir = "runs/shapes_dance_cpu"
    g = cfg.grpo
    g.sde_type, g.noise_level, g.same_initial_noise, g.timestep_fraction = "dance", 0.7, True, 0.6
    g.guard = False
    return cfg


def shapes_mix_cpu() -> TrainConfig:
    """MixGRPO: DanceGRPO's SDE in a window of 2 steps that slides from the first step to the last.

    MixGRPO's "progressive" schedule scaled down (a window of 4 of 25 steps, moved by 1 every 25 iterations):
    a window of 2 of the 10 steps, moved by 1 every 9 iterations, so that 72 iterations sweep all 8 places
    once. ODE outside the window, only the window trained, eta 0.7, shared initial noise per group. KL beta
    0.04 as in ``shapes_dance_cpu`` (MixGRPO's default is 0). MixGRPO-Flash's higher-order ODE after the window
    is not used: 10 Euler steps are already few. Measured in the side-by-side study (docs/results.md): it did
    not raise accuracy (-0.7 points; +1.1 at best while the window sat on the early steps).
    """
    cfg = shapes_dance_cpu()
    cfg.run_dir = "runs/shapes_mix_cpu"
    g = cfg.grpo
    g.timestep_fraction, g.sde_window, g.window_schedule, g.window_iters = 1.0, 2, "progressive", 9
    return cfg


def shapes_draft_cpu() -> TrainConfig:
    """DRaFT-1 against the learned shapes-count reward: the reward's gradient through the last of 4 Euler steps.

    ``shapes-count`` is the judge's partial-credit rule applied to the shipped scorer's predicted counts per colour and
    shape; it tracks the judge better than the scorer's own ``shapes-score`` head, and with it the presets whose
    gradient reaches the middle of the chain raise the judge's counting accuracy (docs/results.md at 7635c1f). 32
    images per iteration (16 prompts x 2), a 4-step Euler training grid with CFG 4.5 (sigmas 1, 0.9, 0.75, 0.5, 0;
    evaluation: 40 steps), loss ``-r``, one optimizer step per iteration, full fine-tune at lr 1e-5 with EMA. The
    coarse grid puts the one trained step at sigma 0.5, where counts are still open: on 20 steps its last sigma is 0.14
    and the judge's counting accuracy rose +2 points on the slow tier's task, on 4 steps +8 to +9 (docs/results.md at
    7635c1f, "DRaFT-LV and DRaFT-1 on a coarser training grid"). The judge scores every training batch as a monitor
    (``judge/*``), and each evaluation scores both learned rewards next to the judge's accuracy, so the gap between the
    learned reward and the truth shows while it trains.
    """
    cfg = shapes_recipe()
    cfg.run_dir = "runs/shapes_draft_cpu"
    cfg.algorithm = "draft"
    cfg.iterations, cfg.group_size, cfg.save_every, cfg.eval_every = 60, 2, 20, 20
    cfg.optim = OptimConfig(lr=1e-5)
    cfg.reward = RewardConfig(names=("shapes-count",))
    cfg.draft = DraftConfig(method="draft", k=1, num_steps=4, micro_batch=16, optimizer_steps=1)
    cfg.eval = EvalConfig(samples_per_prompt=4, rewards=("shapes-count", "shapes-score"))
    return cfg


def shapes_draft_lv_cpu() -> TrainConfig:
    """DRaFT-LV: shapes_draft_cpu with 2 re-noised gradient samples at the last sigma (plus the real one).

    On the 4-step grid the re-noised step starts at sigma 0.5: the judge's counting accuracy rose +13 to +14 points
    on the slow tier's task, against +3 to +6 on a 20-step grid (docs/results.md at 7635c1f).
    """
    cfg = shapes_draft_cpu()
    cfg.run_dir = "runs/shapes_draft_lv_cpu"
    cfg.draft.method = "draft-lv"
    return cfg


def shapes_refl_cpu() -> TrainConfig:
    """ReFL: shapes_draft_cpu on 20 steps, stopped at a random one of the last 9, scored on its clean prediction.

    The last 9 of 20 is FlowBP's share for flow models (the last 11 of 25). Stopping only in the last 5 raised the
    learned reward as much but not the judge's counting accuracy: counts are settled before then (docs/results.md at
    7635c1f).
    """
    cfg = shapes_draft_cpu()
    cfg.run_dir = "runs/shapes_refl_cpu"
    cfg.draft.method, cfg.draft.num_steps, cfg.draft.refl_last = "refl", 20, 9
    return cfg


def shapes_alignprop_cpu() -> TrainConfig:
    """AlignProp: shapes_draft_cpu on a 20-step grid, the gradient through the last K steps, K uniform in 1-20.

    The uniform truncation of AlignProp's code and TRL's default range (0, T). Truncating in the last 5 steps only
    raised the learned reward but not the judge's counting accuracy (docs/results.md at 7635c1f); checkpointing keeps
    the memory bounded whatever K is drawn.
    """
    cfg = shapes_draft_cpu()
    cfg.run_dir = "runs/shapes_alignprop_cpu"
    cfg.draft.method, cfg.draft.num_steps, cfg.draft.alignprop_min = "alignprop", 20, 0
    return cfg


def shapes_leapalign_cpu() -> TrainConfig:
    """LeapAlign: shapes_draft_cpu's recipe with two leaps from a random pair of the 20 steps (alpha 0.3)."""
    cfg = shapes_draft_cpu()
    cfg.run_dir = "runs/shapes_leapalign_cpu"
    cfg.algorithm = "leapalign"
    cfg.leapalign = LeapAlignConfig(num_steps=20, alpha=0.3, tau=0.1, micro_batch=16, optimizer_steps=1)
    return cfg


def sd35m_pickscore_flow_grpo() -> TrainConfig:
    """Flow-GRPO on Stable Diffusion 3.5 Medium against PickScore: the paper's recipe, on 1 to 64 GPUs.

    Needs a model and PickScore (local folders, relative to where you run it, or Hub ids; override with
    --model.path, --reward.pickscore-model, --train-prompts, --eval.prompts): ``models/stable-diffusion-3.5-medium``
    (a diffusers folder), ``models/PickScore_v1`` (PickScore with the CLIP-H processor and tokenizer), and the
    Pick-a-Pic prompt files ``data/pickscore/train.txt`` / ``test.txt``. Settings from the Flow-GRPO SD3.5 PickScore
    config: LoRA r 32, alpha 64, lr 3e-4; 48 prompts x 24 images per iteration (G = 24: smaller groups collapsed in
    the paper), 10 SDE steps at a = 0.7 on the pipeline's grid (evaluation: 40 Euler steps), CFG 4.5, clip 1e-4,
    code-form KL with beta 0.01, 576 images per optimizer step (two per iteration), EMA every 8 steps, 512 px,
    T5 at 128 tokens, bf16 base weights with float32 LoRA. Field by field: docs/papers.md.
    """
    return TrainConfig(
        run_dir="runs/sd35m_pickscore_flow_grpo",
        iterations=1000,
        train_prompts="data/pickscore/train.txt",
        prompts_per_iter=48,
        group_size=24,
        save_every=50,
        eval_every=50,
        model=ModelConfig(kind="sd3", path="models/stable-diffusion-3.5-medium", lora_rank=32, lora_alpha=64,
                          resolution=512, max_sequence_length=128, dtype="bfloat16", device="cuda",
                          gradient_checkpointing=True),
        optim=OptimConfig(lr=3e-4),
        reward=RewardConfig(names=("pickscore",), pickscore_model="models/PickScore_v1", device="cuda"),
        grpo=GRPOConfig(micro_batch=8, optimizer_steps=2, kl_beta=0.01, noise_level=0.7),
        eval=EvalConfig(prompts="data/pickscore/test.txt", samples_per_prompt=1, judge=False, rewards=("pickscore",)),
    )  # fmt: skip


def sd35m_pickscore_nft() -> TrainConfig:
    """DiffusionNFT on Stable Diffusion 3.5 Medium against PickScore, CFG-free (the same folders as the Flow-GRPO one).

    The paper's settings: second-order DPM-Solver rollouts of 10 steps from the old policy, NFT beta 1, adaptive
    x0-space weighting, velocity penalty 1e-4 to the base, old-policy decay min(0.001 k, 0.5), LoRA r 32 at
    lr 3e-4, 48 prompts x 24 images per iteration, one optimizer step per iteration, evaluation without CFG.
    """
    cfg = sd35m_pickscore_flow_grpo()
    cfg.run_dir = "runs/sd35m_pickscore_nft"
    cfg.algorithm = "nft"
    cfg.nft = NFTConfig(micro_batch=8, optimizer_steps=1)
    cfg.ema_every = 1  # DiffusionNFT folds the EMA in after every optimizer step (one per iteration)
    cfg.eval = EvalConfig(prompts="data/pickscore/test.txt", samples_per_prompt=1, guidance_scale=1.0, judge=False,
                          rewards=("pickscore",))  # fmt: skip
    return cfg


def sd35m_ocr_flow_grpo() -> TrainConfig:
    """Flow-GRPO on Stable Diffusion 3.5 Medium for text rendering (the paper's OCR task, 59% -> 92%).

    ``sd35m_pickscore_flow_grpo``'s recipe with the OCR reward (rapidocr, the ``ocr`` extra), KL beta 0.04 as in
    the paper's OCR config, and the shipped text-rendering prompts ``ocr:train`` / ``ocr:eval``: only the model
    folder ``models/stable-diffusion-3.5-medium`` is needed.
    """
    cfg = sd35m_pickscore_flow_grpo()
    cfg.run_dir = "runs/sd35m_ocr_flow_grpo"
    cfg.train_prompts = "ocr:train"
    cfg.reward = RewardConfig(names=("ocr",))
    cfg.grpo.kl_beta = 0.04
    cfg.eval = EvalConfig(prompts="ocr:eval", samples_per_prompt=1, judge=False, rewards=("ocr",))
    return cfg


def sd35m_geneval_flow_grpo() -> TrainConfig:
    """Flow-GRPO on Stable Diffusion 3.5 Medium against GenEval (the paper's headline task, 63% -> 95%).

    ``sd35m_pickscore_flow_grpo``'s recipe with KL beta 0.04 (the paper's GenEval value) and the GenEval reward
    served by ``rewardflow serve-reward geneval --reward.geneval-detector MODULE:FACTORY --port 18085`` in
    GenEval's own environment (Mask2Former + CLIP colours; docs/rewards.md), reached as the ``remote`` reward.
    Needs ``models/stable-diffusion-3.5-medium`` and GenEval-format prompt files (JSON lines with ``tag``,
    ``include``, ``exclude``): ``data/geneval/train_metadata.jsonl`` and ``data/geneval/test_metadata.jsonl``.
    Evaluation scores the held-out prompts with the same server (judge off: these are not Shapes prompts).
    """
    cfg = sd35m_pickscore_flow_grpo()
    cfg.run_dir = "runs/sd35m_geneval_flow_grpo"
    cfg.train_prompts = "data/geneval/train_metadata.jsonl"
    cfg.reward = RewardConfig(names=("remote",), remote_url="http://127.0.0.1:18085")
    cfg.grpo.kl_beta = 0.04
    # Flow-GRPO's test file lists each of GenEval's 553 prompts 4 times: one image a line is GenEval's 4 per prompt.
    cfg.eval = EvalConfig(prompts="data/geneval/test_metadata.jsonl", samples_per_prompt=1, judge=False,
                          rewards=("remote",))  # fmt: skip
    return cfg


def flux_hps_dance_grpo() -> TrainConfig:
    """DanceGRPO on FLUX.1-dev against HPS v2.1: the 8-GPU LoRA script's settings.

    Needs ``models/FLUX.1-dev`` (a diffusers folder), ``models/hps_v2.1`` (converted with
    ``rewardflow.rewards.hps.convert_open_clip_checkpoint``, docs/rewards.md) and HPDv2 training prompts
    ``data/hpdv2/train.txt`` / ``test.txt``. From DanceGRPO's FLUX LoRA script: LoRA r 128, alpha 256 on
    ``to_q to_k to_v to_out.0``, lr 3e-4, weight decay 1e-4, grad clip 1; 12 images per prompt sharing their initial
    noise, 16 prompts per iteration (2 per GPU on 8 GPUs: ``torchrun --nproc_per_node 8``; any other number of
    processes derives its micro-batch, docs/distributed.md), one optimizer step per 96 images (12 per GPU); 12 steps
    of the constant-noise SDE with eta 0.3 on DanceGRPO's grid (a fixed shift of 3), ``int(0.6 x 11)`` = 6 of the 11
    SDE steps trained per image; advantages per group with the unbiased std and eps 1e-8; no KL and no reference
    model (``kl_beta`` 0); no true CFG (the guidance embedding at 3.5); 720 px, bf16. Evaluation: FluxPipeline's
    defaults (28 steps on its grid, guidance 3.5). Field by field against the script: docs/papers.md.
    """
    return TrainConfig(
        run_dir="runs/flux_hps_dance_grpo",
        iterations=300,
        train_prompts="data/hpdv2/train.txt",
        prompts_per_iter=16,
        group_size=12,
        save_every=25,
        eval_every=25,
        ema_decay=0.0,  # no EMA in DanceGRPO: evaluations and exports are the trained weights themselves
        ema_every=1,
        model=ModelConfig(kind="flux", path="models/FLUX.1-dev", lora_rank=128, lora_alpha=256, lora_init="kaiming",
                          lora_targets=("to_q", "to_k", "to_v", "to_out.0"), resolution=720, dtype="bfloat16",
                          device="cuda", gradient_checkpointing=True),
        optim=OptimConfig(lr=3e-4, weight_decay=1e-4),
        reward=RewardConfig(names=("hps",), hps_model="models/hps_v2.1", device="cuda", aggregate="loss"),
        grpo=GRPOConfig(num_steps=12, shift=3.0, sde_type="dance", noise_level=0.3, same_initial_noise=True,
                        timestep_fraction=0.6, guidance_scale=3.5, kl_beta=0.0, micro_batch=4, optimizer_steps=2,
                        grad_clip=1.0, global_std=False, std_unbiased=True, adv_eps=1e-8),
        eval=EvalConfig(prompts="data/hpdv2/test.txt", samples_per_prompt=1, num_steps=28, guidance_scale=3.5,
                        judge=False, rewards=("hps",)),
    )  # fmt: skip


def flux_hps_leapalign() -> TrainConfig:
    """LeapAlign on FLUX.1-dev against HPS v2.1 (the paper's general-preference setting).

    The same folders as ``flux_hps_dance_grpo``. From the published recipe as FlowBP reproduces it: a full
    fine-tune sharded with FSDP (``model.fsdp``: run it under ``torchrun``), bf16 weights with gradient
    checkpointing, 25 Euler steps at 512 px on FluxPipeline's grid, the guidance embedding at 4.0 (no true CFG), a
    step pair drawn uniformly over all steps, alpha 0.3, tau 0.1, the hinge at 0.55 (HPS scores are about 0.3:
    effectively linear), AdamW lr 1e-5 with weight decay 1e-4 and grad clip 1, EMA 0.995, 8 images per GPU (64 per
    iteration with ``torchrun --nproc_per_node 8``). Field by field: docs/papers.md.
    """
    cfg = flux_hps_dance_grpo()
    cfg.run_dir = "runs/flux_hps_leapalign"
    cfg.algorithm = "leapalign"
    cfg.prompts_per_iter, cfg.group_size = 64, 1  # 64 distinct prompts: 8 per GPU on 8 GPUs
    cfg.ema_decay, cfg.ema_every = 0.995, 1
    cfg.reward = dataclasses.replace(cfg.reward, aggregate="reward")
    cfg.model = dataclasses.replace(
        cfg.model, lora_rank=0, lora_alpha=0.0, lora_targets=(), lora_init="gaussian", fsdp=True, resolution=512
    )
    cfg.optim = OptimConfig(lr=1e-5, weight_decay=1e-4)
    cfg.leapalign = LeapAlignConfig(num_steps=25, guidance_scale=4.0, alpha=0.3, tau=0.1, hinge=0.55, micro_batch=2,
                                    optimizer_steps=1, checkpointing=True)  # fmt: skip
    cfg.eval = dataclasses.replace(cfg.eval, num_steps=50, guidance_scale=4.0)
    return cfg


def sd15_aesthetic_draft_lv() -> TrainConfig:
    """DRaFT-LV on Stable Diffusion 1.5 against the LAION aesthetic predictor: DRaFT's original setting.

    Needs ``models/stable-diffusion-v1-5`` (a diffusers folder), ``models/clip-vit-large-patch14`` holding the
    converted ``aesthetic_head.safetensors`` (docs/rewards.md) and a prompt file ``data/aesthetic/train.txt``
    (DRaFT used simple animal prompts). The paper's small-scale settings: LoRA rank 8 at lr 4e-4, weight decay
    0.1, 4 images (4 prompts) per step, 50 sampling steps (deterministic: DDIM's 50 timesteps of the model's
    scheduler config, seen as a flow), CFG 7.5, DRaFT-LV with 2 re-noised samples, 2,000 updates, 512 px, no EMA.
    Field by field: docs/papers.md.
    """
    return TrainConfig(
        run_dir="runs/sd15_aesthetic_draft_lv",
        algorithm="draft",
        iterations=2000,
        train_prompts="data/aesthetic/train.txt",
        prompts_per_iter=4,
        group_size=1,
        save_every=100,
        eval_every=100,
        ema_decay=0.0,  # the paper averages no weights: evaluations and exports are the trained ones
        ema_every=1,
        model=ModelConfig(kind="sd1", path="models/stable-diffusion-v1-5", lora_rank=8, lora_alpha=8,
                          resolution=512, dtype="bfloat16", device="cuda", gradient_checkpointing=True),
        optim=OptimConfig(lr=4e-4, weight_decay=0.1),
        reward=RewardConfig(names=("aesthetic",), aesthetic_model="models/clip-vit-large-patch14", device="cuda"),
        draft=DraftConfig(method="draft-lv", lv_samples=2, num_steps=50, guidance_scale=7.5, micro_batch=4,
                          optimizer_steps=1),
        eval=EvalConfig(prompts="data/aesthetic/train.txt", samples_per_prompt=1, num_steps=50, guidance_scale=7.5,
                        judge=False, rewards=("aesthetic",)),
    )  # fmt: skip


def shapes_grpo_smoke() -> TrainConfig:
    """Two tiny iterations with a tiny evaluation: checks the whole pipeline in about a minute."""
    cfg = shapes_recipe()
    cfg.run_dir = "runs/shapes_grpo_smoke"
    cfg.iterations = 2
    cfg.prompts_per_iter = 2
    cfg.group_size = 4
    cfg.save_every = 1
    cfg.grpo = GRPOConfig(num_steps=4, micro_batch=4, optimizer_steps=2)
    cfg.eval = EvalConfig(prompts="shapes:eval", samples_per_prompt=1, num_steps=4)
    return cfg


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "shapes_grpo_cpu": shapes_grpo_cpu,
    "shapes_grpo": shapes_grpo,
    "shapes_nft_cpu": shapes_nft_cpu,
    "shapes_grpo_fast_cpu": shapes_grpo_fast_cpu,
    "shapes_dance_cpu": shapes_dance_cpu,
    "shapes_mix_cpu": shapes_mix_cpu,
    "shapes_draft_cpu": shapes_draft_cpu,
    "shapes_draft_lv_cpu": shapes_draft_lv_cpu,
    "shapes_refl_cpu": shapes_refl_cpu,
    "shapes_alignprop_cpu": shapes_alignprop_cpu,
    "shapes_leapalign_cpu": shapes_leapalign_cpu,
    "shapes_grpo_smoke": shapes_grpo_smoke,
    "sd35m_pickscore_flow_grpo": sd35m_pickscore_flow_grpo,
    "sd35m_pickscore_nft": sd35m_pickscore_nft,
    "sd35m_ocr_flow_grpo": sd35m_ocr_flow_grpo,
    "sd35m_geneval_flow_grpo": sd35m_geneval_flow_grpo,
    "flux_hps_dance_grpo": flux_hps_dance_grpo,
    "flux_hps_leapalign": flux_hps_leapalign,
    "sd15_aesthetic_draft_lv": sd15_aesthetic_draft_lv,
}


def get_preset(name: str) -> TrainConfig:
    """The preset of that name. Raises ValueError naming the closest presets and listing all when it is unknown."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ValueError(f"unknown preset {name!r}; {hint}available presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
