"""The training loop: build, roll out, reward, update, log, evaluate, save. Read it top to bottom."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import rewardflow
from rewardflow.algorithms import grpo, nft
from rewardflow.algorithms.advantages import aggregate_advantages, zero_std_fraction
from rewardflow.algorithms.draft import check_differentiable, direct_train_step, draft_loss
from rewardflow.algorithms.leapalign import leapalign_loss
from rewardflow.config import DIRECT, TrainConfig, from_yaml, to_yaml
from rewardflow.data.prompts import GroupedPromptSampler, check_prompts, load_prompts
from rewardflow.evaluate import evaluate
from rewardflow.models.tiny_dit import TinyDiTPolicy, load_policy
from rewardflow.rewards import RewardFn, build_reward
from rewardflow.rewards.shapes import ShapesJudgeReward
from rewardflow.shapes.grammar import parse_prompt
from rewardflow.utils.checkpoint import load_state, load_trainable, save_state_atomic, save_trainable
from rewardflow.utils.ema import EMA, warmup_decay
from rewardflow.utils.logging import append_jsonl, git_commit, plot_curves, read_jsonl, save_grid, setup_file_logging

log = logging.getLogger(__name__)
STATE = "checkpoints/state.pt"


def config_differences(a: TrainConfig, b: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of the fields whose values differ between two configs."""

    def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(obj, dict):
            return {k2: v2 for k, v in obj.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
        return {prefix.rstrip("."): obj}

    fa, fb = flat(dataclasses.asdict(a)), flat(dataclasses.asdict(b))
    return sorted(k for k in fa.keys() | fb.keys() if k not in ignore and fa.get(k) != fb.get(k))


def check_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    """Validate the run folder without writing: fresh runs need an empty folder, resumes a matching config."""
    run = Path(cfg.run_dir)
    if not resume:
        if run.exists() and any(run.iterdir()):
            raise FileExistsError(f"run folder {run} is not empty; pick another --run-dir or pass --resume")
        return run
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"cannot resume: {run / 'config.yaml'} does not exist")
    # Where it runs and how long are not part of a run's identity: a GPU run may be resumed on a CPU and extended.
    saved = from_yaml((run / "config.yaml").read_text())
    differ = config_differences(saved, cfg, ignore=("iterations", "model.device", "threads"))
    if differ:
        raise ValueError(f"cannot resume {run}: these fields differ from its config.yaml: {', '.join(differ)}")
    return run


def write_run_header(cfg: TrainConfig, run: Path, resume: bool) -> None:
    """The resolved config, the folders, and (for a new run) the package version and git commit."""
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "samples").mkdir(exist_ok=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    if resume and (run / "meta.json").exists():
        return
    meta = {"rewardflow_version": rewardflow.__version__, "git_commit": git_commit(), "torch": torch.__version__}
    (run / "meta.json").write_text(json.dumps(meta, indent=2))


def build_policy(cfg: TrainConfig) -> TinyDiTPolicy:
    """The policy a run trains, as its ``model`` section describes."""
    m = cfg.model
    return load_policy(
        m.checkpoint, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha, autocast=m.autocast, device=m.resolved_device()
    )


def run_eval(policy: TinyDiTPolicy, ema: EMA, cfg: TrainConfig, run: Path, iteration: int) -> dict[str, Any]:
    """Evaluate the EMA weights; write ``eval/iter_XXXXX.json`` and a sample grid."""
    t0 = time.time()
    with ema.swapped():
        report, images = evaluate(policy, cfg.eval)
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / f"iter_{iteration:05d}.json").write_text(json.dumps(report, indent=2))
    per = cfg.eval.samples_per_prompt
    save_grid(images[:: per * 3][:48], run / "samples" / f"eval_{iteration:05d}.png")
    log.info(
        "eval at iteration %d: strict %.3f clean %.3f (%.0fs)",
        iteration,
        report["overall"],
        report["clean_overall"],
        time.time() - t0,
    )
    return {"iteration": iteration, **{f"eval/{k}": v for k, v in report.items() if k != "settings"}}


def save(
    cfg: TrainConfig, policy: TinyDiTPolicy, optimizer: torch.optim.Optimizer, ema: EMA, run: Path, iteration: int
) -> None:
    """EMA weights for use (``checkpoints/iter_XXXXX.safetensors``) and a resume state."""
    with ema.swapped():
        save_trainable(
            list(policy.named_trainable_state()),
            run / "checkpoints" / f"iter_{iteration:05d}.safetensors",
            iteration=str(iteration),
            weights="ema",
        )
    state = {
        "iteration": iteration,
        "trainable": {n: p.detach().clone() for n, p in policy.named_trainable_state()},
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict(),
    }
    if cfg.algorithm == "nft":
        state["old"] = {n: t.detach().clone() for n, t in policy.named_old_state()}
    save_state_atomic(state, run / STATE)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) training as configured; returns the run folder.

    Everything that can fail on bad input (prompt files, checkpoint, resume state, run folder) is checked
    before the first file is written, so a failed start leaves the folder as it was.
    """
    records = load_prompts(cfg.train_prompts)
    check_prompts(records, cfg.train_prompts, parse_prompt)
    sampler = GroupedPromptSampler(
        records, cfg.prompts_per_iter, cfg.group_size, cfg.seed, balance_by=cfg.balance_prompts_by
    )
    check_prompts(load_prompts(cfg.eval.prompts), cfg.eval.prompts, parse_prompt)
    run = check_run_dir(cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    policy = build_policy(cfg)
    params = policy.trainable_parameters()
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    ema = EMA(params, warmup_decay(cfg.ema_decay), every=cfg.ema_every)
    if cfg.algorithm == "nft":
        policy.init_old()
    reward_fn = build_reward(cfg.reward)
    if cfg.algorithm in DIRECT:
        check_differentiable(reward_fn, cfg.algorithm)
    start = 0
    if resume and (run / STATE).exists():
        state = load_state(run / STATE)
        own = dict(policy.named_trainable_state())
        if set(state["trainable"]) != set(own):
            raise ValueError(f"resume state {run / STATE} does not hold this policy's trainable weights")
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                own[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start = int(state["iteration"])
        if cfg.algorithm == "nft":
            old = dict(policy.named_old_state())
            if set(state.get("old", {})) != set(old):
                raise ValueError(f"resume state {run / STATE} does not hold this policy's old (rollout) weights")
            with torch.no_grad():
                for name, tensor in old.items():
                    tensor.copy_(state["old"][name])
    write_run_header(cfg, run, resume)
    metrics_path = run / "metrics.jsonl"
    if resume:
        # Iterations after the last save are replayed: drop their old records.
        kept = [m for m in read_jsonl(metrics_path) if m["iteration"] <= start] if start else []
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        log.info("resuming %s at iteration %d", run, start)
    handler = setup_file_logging(run / "train.log")
    try:
        return _loop(cfg, run, policy, optimizer, ema, reward_fn, sampler, start)
    finally:
        logging.getLogger("rewardflow").removeHandler(handler)
        handler.close()


def _loop(
    cfg: TrainConfig,
    run: Path,
    policy: TinyDiTPolicy,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    reward_fn: RewardFn,
    sampler: GroupedPromptSampler,
    start: int,
) -> Path:
    params = policy.trainable_parameters()
    metrics_path = run / "metrics.jsonl"
    log.info("%s; %d trainable parameters", cfg.summary(), sum(p.numel() for p in params))
    if start == 0:
        append_jsonl(metrics_path, run_eval(policy, ema, cfg, run, 0))
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="train", dynamic_ncols=True)
    for it in bar:
        t0 = time.time()
        # One generator per iteration, seeded by (seed, iteration): a resumed run draws the same noise.
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, it]).generate_state(1)[0]))
        rows, groups = sampler.batch(it)
        cond = policy.encode_prompts([r.prompt for r in rows])
        group_ids = torch.from_numpy(groups)
        metadata = [r.metadata for r in rows]
        if cfg.algorithm in DIRECT:
            images, reward, update = direct_iteration(cfg, policy, optimizer, ema, reward_fn, cond, metadata, gen)
        else:
            images, reward, update = online_iteration(
                cfg, policy, optimizer, ema, reward_fn, cond, metadata, group_ids, gen, it
            )
        record = {
            "iteration": it + 1,
            "reward": reward.scores.mean().item(),
            "reward_std": reward.scores.std().item(),
            **{k: v.mean().item() for k, v in reward.details.items()},
            **{f"reward/{k}": v.mean().item() for k, v in reward.components.items() if len(reward.components) > 1},
            "zero_std_groups": zero_std_fraction(reward.scores, group_ids),
            **update,
            "time_iteration": time.time() - t0,
        }
        append_jsonl(metrics_path, record)
        shown = {k: f"{update[k]:.2e}" for k in ("kl", "clip_frac", "ref_loss", "loss") if k in update}
        bar.set_postfix(reward=f"{record['reward']:.3f}", **shown)
        done = it + 1
        if done == 1 or done % cfg.save_every == 0:
            save_grid(images[:64], run / "samples" / f"train_{done:05d}.png")
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.iterations:
            append_jsonl(metrics_path, run_eval(policy, ema, cfg, run, done))
        if done % cfg.save_every == 0 or done == cfg.iterations:
            save(cfg, policy, optimizer, ema, run, done)
            plot_curves(read_jsonl(metrics_path), run / "reward_curve.png")
    plot_curves(read_jsonl(metrics_path), run / "reward_curve.png")
    return run


def online_iteration(
    cfg: TrainConfig,
    policy: TinyDiTPolicy,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    reward_fn: RewardFn,
    cond: Any,
    metadata: list[dict[str, Any]],
    group_ids: torch.Tensor,
    gen: torch.Generator,
    it: int,
) -> tuple[torch.Tensor, Any, dict[str, float]]:
    """Roll out, score, turn rewards into advantages, update (Flow-GRPO family and DiffusionNFT)."""
    t0 = time.time()
    if cfg.algorithm == "grpo":
        batch = grpo.collect(policy, cond, cfg.grpo, gen, group_ids, iteration=it)
        final = batch.xs[:, -1]
    else:
        nft_batch = nft.collect(policy, cond, cfg.nft, gen)
        final = nft_batch.x0
    if final.device.type == "cuda":
        torch.cuda.synchronize()  # the rollout's kernels are asynchronous: time them, not their launches
    t_rollout = time.time() - t0
    images = policy.decode(final)
    reward = reward_fn(images, cond.prompts, metadata)
    adv = aggregate_advantages(
        reward.scores,
        reward.components,
        dict(zip(cfg.reward.names, cfg.reward.resolved_weights)),
        group_ids,
        cfg.reward.aggregate,
        global_std=cfg.algo.global_std,
        clip=cfg.algo.adv_clip_max,
    )
    t1 = time.time()
    if cfg.algorithm == "grpo":
        if cfg.grpo.best_worst_k:
            keep = grpo.best_worst_rows(adv, group_ids, cfg.grpo.best_worst_k)
            batch, adv = batch.select(keep), adv[keep]
        update = grpo.train_step(policy, optimizer, batch, adv.to(policy.device), cfg.grpo, ema.step, generator=gen)
    else:
        r = nft.optimality_probability(adv.to(policy.device), cfg.nft.adv_clip_max, cfg.nft.adv_mode)
        update = nft.train_step(policy, optimizer, nft_batch, r, cfg.nft, ema.step, generator=gen)
        # After the iteration's updates, the old policy moves towards the trained one.
        update["old_eta"] = nft.old_decay((it + 1) * cfg.nft.optimizer_steps, cfg.nft)
        policy.soft_update_old(update["old_eta"])
    return images, reward, {**update, "time_rollout": t_rollout, "time_train": time.time() - t1}


def direct_iteration(
    cfg: TrainConfig,
    policy: TinyDiTPolicy,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    reward_fn: RewardFn,
    cond: Any,
    metadata: list[dict[str, Any]],
    gen: torch.Generator,
) -> tuple[torch.Tensor, Any, dict[str, float]]:
    """Sample with gradient, backpropagate the reward (DRaFT family, LeapAlign).

    The Shapes judge scores the same images as a monitor (``judge/*``): the learned reward is what is optimised,
    the judge is the truth it stands in for, and the gap between them is where reward hacking shows.
    """
    if cfg.algorithm == "draft":
        loss_fn = draft_loss(reward_fn, cfg.draft)
    else:
        loss_fn = leapalign_loss(reward_fn, cfg.leapalign)
    update, final, reward = direct_train_step(
        policy, optimizer, cond, metadata, loss_fn, cfg.algo, ema.step, generator=gen
    )
    images = policy.decode(final)
    judged = ShapesJudgeReward(cfg.reward.extra_object_penalty)(images, cond.prompts, metadata)
    update.update({f"judge/{k}": v.mean().item() for k, v in judged.details.items()})
    update["judge/reward"] = judged.scores.mean().item()
    return images, reward, update


def load_trained_policy(run_dir: str | Path, device: str | None = None) -> tuple[TinyDiTPolicy, TrainConfig]:
    """The policy of a run folder with its latest EMA checkpoint loaded, and the run's config.

    ``device`` overrides the run's ``model.device`` (a run trained on a GPU can be evaluated on a CPU).
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run folder (no config.yaml)")
    cfg = from_yaml((run / "config.yaml").read_text())
    ckpts = sorted((run / "checkpoints").glob("iter_*.safetensors"))
    if not ckpts:
        raise FileNotFoundError(f"run folder {run} has no checkpoints/iter_*.safetensors yet")
    if device is not None:
        cfg.model = dataclasses.replace(cfg.model, device=device)  # re-checks the value
    policy = build_policy(cfg)
    load_trainable(list(policy.named_trainable_state()), ckpts[-1])
    return policy, cfg
