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
from rewardflow.algorithms.advantages import zero_std_fraction
from rewardflow.algorithms.draft import check_differentiable
from rewardflow.config import DIRECT, TrainConfig, from_yaml, to_yaml
from rewardflow.data.prompts import GroupedPromptSampler, check_prompts, load_prompts
from rewardflow.evaluate import eval_rewards, evaluate, headline
from rewardflow.iteration import direct_iteration, online_iteration
from rewardflow.models.protocol import FlowPolicy
from rewardflow.models.tiny_dit import load_policy
from rewardflow.rewards import RewardFn, build_reward
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


def build_policy(cfg: TrainConfig) -> FlowPolicy:
    """The policy a run trains, as its ``model`` section describes."""
    m = cfg.model
    if m.kind == "tiny-dit":
        return load_policy(
            m.checkpoint,
            lora_rank=m.lora_rank,
            lora_alpha=m.lora_alpha,
            autocast=m.autocast,
            device=m.resolved_device(),
        )
    if m.kind == "sd3":
        from rewardflow.models.sd3 import load_sd3_policy as load
    elif m.kind == "flux":
        from rewardflow.models.flux import load_flux_policy as load
    else:
        from rewardflow.models.sd1 import load_sd1_policy as load
    return load(
        m.path,
        lora_rank=m.lora_rank,
        lora_alpha=m.lora_alpha,
        device=m.resolved_device(),
        dtype=getattr(torch, m.dtype),
        resolution=m.resolution or None,
        gradient_checkpointing=m.gradient_checkpointing,
        autocast=m.autocast and m.dtype == "float32",
    )


def check_sigma_max(cfg: TrainConfig, policy: FlowPolicy) -> None:
    """The sampling grids must start where the model's noise is (1 for flows, ``sigma_max`` for SD 1.x)."""
    for field, value in ((f"{cfg.algorithm}.sigma_max", cfg.algo.sigma_max), ("eval.sigma_max", cfg.eval.sigma_max)):
        if abs(value - policy.sigma_max) > 1e-3:
            raise ValueError(
                f"{field} is {value}, but model.kind {cfg.model.kind!r} starts sampling at sigma "
                f"{policy.sigma_max:.6f}: set {cfg.algorithm}.sigma_max and eval.sigma_max to it"
            )


def run_eval(
    policy: FlowPolicy, ema: EMA, cfg: TrainConfig, run: Path, iteration: int, rewards: Any = None
) -> dict[str, Any]:
    """Evaluate the EMA weights (``rewards``: the built ``eval.rewards``); write the report and a grid."""
    t0 = time.time()
    with ema.swapped():
        report, images = evaluate(policy, cfg.eval, cfg.reward, rewards)
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / f"iter_{iteration:05d}.json").write_text(json.dumps(report, indent=2))
    per = cfg.eval.samples_per_prompt
    save_grid(images[:: per * 3][:48], run / "samples" / f"eval_{iteration:05d}.png")
    log.info("eval at iteration %d: %s (%.0fs)", iteration, headline(report), time.time() - t0)
    return {"iteration": iteration, **{f"eval/{k}": v for k, v in report.items() if k != "settings"}}


def save(
    cfg: TrainConfig, policy: FlowPolicy, optimizer: torch.optim.Optimizer, ema: EMA, run: Path, iteration: int
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
    if cfg.uses_shapes_prompts:
        check_prompts(records, cfg.train_prompts, parse_prompt)
    sampler = GroupedPromptSampler(
        records, cfg.prompts_per_iter, cfg.group_size, cfg.seed, balance_by=cfg.balance_prompts_by
    )
    if cfg.eval.judge:
        check_prompts(load_prompts(cfg.eval.prompts), cfg.eval.prompts, parse_prompt)
    run = check_run_dir(cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    policy = build_policy(cfg)
    check_sigma_max(cfg, policy)
    params = policy.trainable_parameters()
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    ema = EMA(params, warmup_decay(cfg.ema_decay), every=cfg.ema_every)
    if cfg.algorithm == "nft":
        policy.init_old()
    reward_fn = build_reward(cfg.reward)
    eval_scorers = eval_rewards(cfg.eval, cfg.reward)  # built before anything is written: a bad folder fails here
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
        return _loop(cfg, run, policy, optimizer, ema, reward_fn, sampler, start, eval_scorers)
    finally:
        logging.getLogger("rewardflow").removeHandler(handler)
        handler.close()


def _loop(
    cfg: TrainConfig,
    run: Path,
    policy: FlowPolicy,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    reward_fn: RewardFn,
    sampler: GroupedPromptSampler,
    start: int,
    eval_scorers: Any = None,
) -> Path:
    params = policy.trainable_parameters()
    metrics_path = run / "metrics.jsonl"
    log.info("%s; %d trainable parameters", cfg.summary(), sum(p.numel() for p in params))
    if start == 0:
        append_jsonl(metrics_path, run_eval(policy, ema, cfg, run, 0, eval_scorers))
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
            append_jsonl(metrics_path, run_eval(policy, ema, cfg, run, done, eval_scorers))
        if done % cfg.save_every == 0 or done == cfg.iterations:
            save(cfg, policy, optimizer, ema, run, done)
            plot_curves(read_jsonl(metrics_path), run / "reward_curve.png")
    plot_curves(read_jsonl(metrics_path), run / "reward_curve.png")
    return run


def load_trained_policy(run_dir: str | Path, device: str | None = None) -> tuple[FlowPolicy, TrainConfig]:
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
