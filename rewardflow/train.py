"""The training loop: build, roll out, reward, update, log, evaluate, save. Read it top to bottom."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch

from rewardflow.algorithms.advantages import zero_std_fraction
from rewardflow.algorithms.base import Algorithm, Batch, Tools
from rewardflow.algorithms.batching import KeyedRandom, RowLayout
from rewardflow.build import build_policy
from rewardflow.config import TrainConfig
from rewardflow.data.prompts import GroupedPromptSampler, load_prompts
from rewardflow.evaluate import eval_rewards, evaluate, headline, load_reference, save_reference
from rewardflow.models.protocol import FlowPolicy
from rewardflow.rewards import build_judge, build_reward
from rewardflow.run_state import (
    StopSignals,
    TrainingStopped,
    check_run_dir,
    resume_from_newest,
    save_all,
    write_run_header,
)
from rewardflow.utils import distributed
from rewardflow.utils.checkpoint import state_files
from rewardflow.utils.ema import EMA, warmup_decay
from rewardflow.utils.errors import RunFailed
from rewardflow.utils.logging import append_jsonl, plot_curves, read_jsonl, save_grid, setup_file_logging
from rewardflow.utils.progress import TrainProgress
from rewardflow.utils.trackers import Trackers

log = logging.getLogger(__name__)
BASE_REFERENCE = "eval/base_pooled.safetensors"  # the base model's evaluation images, for drift


def run_eval(
    policy: FlowPolicy,
    ema: EMA,
    cfg: TrainConfig,
    run: Path,
    iteration: int,
    rewards: Any = None,
    world: distributed.World | None = None,
    sharded: bool = False,
    subset: bool = False,
) -> dict[str, Any]:
    """Evaluate the EMA weights (``rewards``: the built ``eval.rewards``); rank 0 writes the report and a grid.

    Under torchrun every rank samples and scores its share of the evaluation (:func:`evaluate`); ``sharded``: the
    model is sharded with FSDP, so the ranks run the same forward passes. ``subset``: on ``eval.subset_every``'s
    subset of the prompts (no grid then: the grids compare the same prompts at every checkpoint).
    """
    t0 = time.time()
    main = world is None or world.main
    reference = load_reference(run / BASE_REFERENCE, cfg.eval) if iteration and main else None
    label = f"eval at iteration {iteration}" + (f" (1 prompt in {cfg.eval.subset_every})" if subset else "")
    with ema.swapped():
        report, images = evaluate(policy, cfg.eval, cfg.reward, rewards, reference, world=world, lockstep=sharded,
                                  subset=subset, progress=label)  # fmt: skip
    if not main:
        return {}
    (run / "eval").mkdir(exist_ok=True)
    if iteration == 0:
        save_reference(run / BASE_REFERENCE, cfg.eval, images.pooled)
    (run / "eval" / f"iter_{iteration:05d}.json").write_text(json.dumps(report, indent=2))
    if not subset:
        save_grid(images.samples, run / "samples" / f"eval_{iteration:05d}.png")
    log.info("%s: %s (%.0fs)", label, headline(report), time.time() - t0)
    return {"iteration": iteration, **{f"eval/{k}": v for k, v in report.items() if k != "settings"}}


def train(cfg: TrainConfig, resume: bool | str = False, preset: str = "") -> Path:
    """Run (or resume) training as configured; returns the run folder.

    ``resume``: False starts a new run (the folder must be empty), True continues the run in the folder from its
    newest complete checkpoint, ``"auto"`` does that when the folder holds a run and starts one otherwise (for
    job schedulers that restart a job). Under torchrun every process calls this; rank 0 writes the run folder.

    Everything that can fail on bad input (prompt files, checkpoint, resume state, run folder) is checked
    before the first file is written, so a failed start leaves the folder as it was.
    """
    device_type = torch.device(cfg.model.resolved_device()).type
    world = distributed.init(device_type)
    if world.size > 1 and device_type == "cuda":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=f"cuda:{world.local_rank}"))
    cfg, changes = cfg.for_world(world.size)
    if changes and world.main:
        log.info("batch geometry for %d processes: %s", world.size, ", ".join(changes))
    method = cfg.method()
    method.check_world(world.size)
    layout(cfg, world, torch.zeros(cfg.rows_per_iter))  # the batch must split over the ranks
    records = load_prompts(cfg.train_prompts)
    judge = build_judge(cfg.reward)
    if cfg.uses_shapes_prompts:
        judge.check_prompts(records, cfg.train_prompts)
    sampler = GroupedPromptSampler(
        records, cfg.prompts_per_iter, cfg.group_size, cfg.seed, balance_by=cfg.balance_prompts_by
    )
    if cfg.eval.judge:
        judge.check_prompts(load_prompts(cfg.eval.prompts), cfg.eval.prompts)
    if resume == "auto":
        resume = (Path(cfg.run_dir) / "config.yaml").is_file()
    run = check_run_dir(cfg, bool(resume)) if world.main else Path(cfg.run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    policy = build_policy(cfg.model, method.needs_reference)
    method.prepare(policy)
    sharded = cfg.model.fsdp and world.size > 1
    if sharded:  # before the optimizer and the EMA see the weights: sharding replaces them by DTensors
        policy.weights.shard(bf16=cfg.model.dtype == "bfloat16")
    params = policy.trainable_parameters()
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    ema = EMA(params, warmup_decay(cfg.ema_decay), every=cfg.ema_every)
    if sharded:
        ema.on_swap = lambda: distributed.reshard(policy.module)
    reward_fn = build_reward(cfg.reward)
    eval_scorers = eval_rewards(cfg.eval, cfg.reward)  # every rank scores its share; built before anything is written
    method.check_reward(reward_fn)
    monitor = judge if method.monitored and cfg.eval.judge else None
    tools = Tools(policy, optimizer, ema, reward_fn, cfg.reward, cfg.overlap_scoring, monitor)
    start = 0
    if resume:
        found = resume_from_newest(method, policy, optimizer, ema, run, sharded)
        if found is not None:
            start = found
        elif state_files(run / "checkpoints"):
            raise ValueError(
                f"cannot resume {run}: none of its resume states is complete (see the messages above); "
                "nothing was changed. Start a new run in another folder"
            )
    if world.main:
        write_run_header(cfg, run, bool(resume), preset)
    distributed.barrier()  # the folder exists before any rank goes on
    metrics_path = run / "metrics.jsonl"
    if resume and world.main:
        # Iterations after the checkpoint are replayed: drop their records (and a line cut short by a crash).
        kept = [m for m in read_jsonl(metrics_path, tolerate_cut_last_line=True) if m["iteration"] <= start]
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept if start))
        log.info("resuming %s at iteration %d", run, start)
    handler = setup_file_logging(run / "train.log") if world.main else None
    trackers = Trackers(cfg.trackers if world.main else (), run, cfg.wandb_project, cfg.wandb_mode,
                        dataclasses.asdict(cfg))  # fmt: skip
    try:
        with StopSignals() as stop:
            return _loop(cfg, run, method, tools, sampler, start, eval_scorers, trackers, world, stop, sharded)
    finally:
        trackers.close()
        if handler is not None:
            logging.getLogger("rewardflow").removeHandler(handler)
            handler.close()


def layout(cfg: TrainConfig, world: distributed.World, group_ids: torch.Tensor) -> RowLayout:
    """Which of the iteration's rows (``group_ids``: every row's group) this rank holds."""
    a = cfg.algo
    return RowLayout.build(a.micro_batch, a.optimizer_steps, cfg.algorithm, world, group_ids)


def _loop(
    cfg: TrainConfig,
    run: Path,
    method: Algorithm,
    tools: Tools,
    sampler: GroupedPromptSampler,
    start: int,
    eval_scorers: Any,
    trackers: Trackers,
    world: distributed.World,
    stop: StopSignals,
    sharded: bool = False,
) -> Path:
    policy, ema = tools.policy, tools.ema
    params = policy.trainable_parameters()
    metrics_path = run / "metrics.jsonl"
    log.info("%s; %d trainable parameters; %d process(es)", cfg.summary(), sum(p.numel() for p in params),
             world.size)  # fmt: skip

    def evaluated_at(done: int) -> bool:
        return bool(cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.iterations

    prompts, per = len(load_prompts(cfg.eval.prompts)), cfg.eval.samples_per_prompt
    full, subset_images = prompts * per, len(range(0, prompts, max(cfg.eval.subset_every, 1))) * per

    def images_left(done: int) -> int:
        """Evaluation images still to sample once iteration ``done`` is trained (its own evaluation included)."""
        middle = sum(evaluated_at(d) for d in range(max(done, 1), cfg.iterations))
        return full + middle * (subset_images if cfg.eval.subset_every > 1 else full)

    progress = TrainProgress(start, cfg.iterations, images_left, enabled=world.main)

    def record_eval(done: int) -> None:
        subset = cfg.eval.subset_every > 1 and 0 < done < cfg.iterations
        t_eval = time.time()
        record = run_eval(policy, ema, cfg, run, done, eval_scorers, world, sharded, subset)
        progress.evaluated(time.time() - t_eval, subset_images if subset else full)
        if not world.main:
            return
        append_jsonl(metrics_path, record)
        trackers.log(record)
        if not subset:
            trackers.log_image("samples/eval", run / "samples" / f"eval_{done:05d}.png", done)

    if start == 0:
        record_eval(0)
    bad_in_a_row = 0
    for it in range(start, cfg.iterations):
        t0 = time.time()
        rows, groups = sampler.global_batch(it)
        rows_of = layout(cfg, world, torch.from_numpy(groups))
        rows = [rows[i] for i in rows_of.own]
        # Every random draw of the iteration comes from streams keyed by (seed, iteration, purpose, global row):
        # a resumed run, or the same rows on another rank, draws exactly the same.
        random = KeyedRandom(cfg.seed, it, rows_of.own)
        cond = policy.encode_prompts([r.prompt for r in rows])
        batch = Batch(cond, [r.metadata for r in rows], rows_of, random, it)
        images, reward, update = method.step(tools, batch)
        record = {
            "iteration": it + 1,
            "reward": reward.scores.mean().item(),
            "reward_std": reward.scores.std().item(),
            **{k: v.mean().item() for k, v in reward.details.items()},
            **{f"reward/{k}": v.mean().item() for k, v in reward.components.items() if len(reward.components) > 1},
            "zero_std_groups": zero_std_fraction(reward.scores, rows_of.group_ids),
            **update,
            "time_iteration": time.time() - t0,
        }
        done = it + 1
        bad_in_a_row = bad_in_a_row + 1 if update.get("skipped_steps", 0) > 0 else 0
        if world.main:
            append_jsonl(metrics_path, record)
            trackers.log(record)
            shown = {k: f"{update[k]:.2e}" for k in ("kl", "clip_frac", "ref_loss", "loss") if k in update}
            progress.update({"reward": f"{record['reward']:.3f}", **shown})
            if done == 1 or done % cfg.save_every == 0:
                save_grid(images[:64], run / "samples" / f"train_{done:05d}.png")
                trackers.log_image("samples/train", run / "samples" / f"train_{done:05d}.png", done)
        if bad_in_a_row >= cfg.max_bad_iterations:
            raise RunFailed(
                f"{bad_in_a_row} iterations in a row skipped their update for non-finite rewards or gradients "
                f"(iteration {done}); the last checkpoint in {run / 'checkpoints'} is from before them. Lower "
                "optim.lr or the clip range, or check the reward"
            )
        if done == cfg.iterations:
            progress.close()  # the final evaluation shows its own progress, after the training bar
        t_eval = time.time()
        if evaluated_at(done):
            record_eval(done)
        t_eval = time.time() - t_eval
        stopping = distributed.any_rank(stop.received is not None)
        if done % cfg.save_every == 0 or done == cfg.iterations or stopping:
            distributed.check_in_step(params, "trained weights")
            with stop.saving():
                save_all(cfg, method, tools, run, done, world, sharded)
            if world.main:
                plot_curves(read_jsonl(metrics_path), run / "reward_curve.png")
            distributed.barrier()
        progress.account(time.time() - t0 - t_eval)
        if stopping:
            progress.close()
            raise TrainingStopped(stop.received or signal.SIGTERM, done, run)
    progress.close()
    if world.main:
        plot_curves(read_jsonl(metrics_path), run / "reward_curve.png")
    return run
