"""``rewardflow`` command line: train | eval | pretrain | reward-model | report | presets.

rewardflow train PRESET [--run-dir DIR] [--resume [auto]] [--field.sub-field VALUE ...]   (--help: the common
  settings; --help-all: every one)
torchrun --nproc_per_node N -m rewardflow.cli train PRESET ...   (data parallel over N processes)
rewardflow eval (--run-dir DIR | --base | --checkpoint FILE) [--prompts FILE] [--out FILE.json]
rewardflow pretrain [--out-dir DIR] [--steps N ...]
rewardflow reward-model [--out FILE] [--steps N ...]   (trains the learned shapes-score reward)
rewardflow serve-reward NAME [--port N] [--token-env VAR] [--reward.field VALUE ...]   (a reward over HTTP)
rewardflow report RUN_DIR [--out FILE.html]   (one self-contained HTML page about a run)
rewardflow export RUN_DIR --out DIR [--iteration N]   (a run's weights as a diffusers pipeline loads them)
rewardflow presets
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tyro

from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.server import ServerLimits
from rewardflow.shapes.grammar import PromptError

if TYPE_CHECKING:  # annotations only: importing the run config builds the algorithm registry, which most commands skip
    from rewardflow.config import TrainConfig

USAGE = __doc__


@dataclass
class EvalArgs:
    """Evaluate a trained run, the shipped base model, or any tiny-DiT checkpoint on a prompt set."""

    run_dir: str | None = None
    """A run folder: its latest EMA checkpoint and its evaluation settings are used."""
    base: bool = False
    """Evaluate the shipped base model."""
    checkpoint: str | None = None
    """A tiny-DiT checkpoint file (as written by ``rewardflow pretrain``)."""
    prompts: str | None = None
    """Prompt file (.txt or .jsonl) or a shipped set (shapes:eval, shapes:train); default shapes:eval."""
    out: str | None = None
    """Where to write the JSON report (default: RUN_DIR/eval/final.json, or standard output)."""
    samples_per_prompt: int | None = None
    num_steps: int | None = None
    guidance_scale: float | None = None
    """Classifier-free guidance scale (1 turns CFG off)."""
    solver: str | None = None
    """Deterministic sampler: euler, heun or dpm2."""
    seed: int | None = None
    rewards: tuple[str, ...] | None = None
    """Registered rewards to score the images with besides the judge (default: the run's ``eval.rewards``)."""
    grid: str | None = None
    """Optional PNG path for a grid of the samples."""
    device: str | None = None
    """Where to sample: "cpu", "cuda", "cuda:N" or "auto" (default: the run's model.device, else "cpu")."""


# The settings a newcomer changes first: (flag, the config field it sets, what it does).
COMMON = (
    ("--run-dir DIR", "run_dir", "where the run is written (config, metrics, checkpoints, samples)"),
    ("--iterations N", "iterations", "training iterations"),
    ("--optim.lr LR", "optim.lr", "learning rate"),
    ("--reward.names NAME ...", "reward.names", "the rewards (rewardflow/rewards: shapes-judge, pickscore, ...)"),
    ("--model.device DEVICE", "model.device", "cpu, cuda, cuda:N or auto"),
    ("--eval-every N", "eval_every", "iterations between evaluations (0: only at the start and the end)"),
    ("--seed N", "seed", "seeds every random draw"),
    ("--threads N", "threads", "torch CPU threads (0: torch's default)"),
)


def train_help(name: str, cfg: TrainConfig) -> str:
    """The short ``train PRESET --help``: the common settings with the preset's values, then where the rest are."""
    lines = [f"rewardflow train {name} [--field VALUE ...] [--resume [auto]]", "", "Common settings (this preset's "
             "value in brackets):"]  # fmt: skip
    for flag, field_name, text in COMMON:
        value: Any = cfg
        for part in field_name.split("."):
            value = getattr(value, part)
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
        lines.append(f"  {flag:<26}{text} [{shown}]")
    lines += [
        f"  {'--resume [auto]':<26}continue the run in --run-dir from its newest checkpoint (auto: if it has one)",
        f"  {f'--{cfg.algorithm}.FIELD VALUE':<26}the algorithm's settings ({cfg.algorithm} for this preset)",
        "",
        f"Every option, by section (model, optim, reward, eval, each algorithm): rewardflow train {name} --help-all",
    ]
    return "\n".join(lines)


def _cmd_train(argv: list[str]) -> None:
    from rewardflow.presets import PRESETS, get_preset
    from rewardflow.train import train

    if not argv or argv[0].startswith("-"):
        raise ValueError(f"usage: rewardflow train PRESET [--field VALUE ...]; presets: {', '.join(PRESETS)}")
    name, rest = argv[0], argv[1:]
    resume: bool | str = False
    if "--resume" in rest:  # --resume (the folder must hold a run) or --resume auto (resume if it does)
        i = rest.index("--resume")
        resume = "auto" if rest[i + 1 : i + 2] == ["auto"] else True
        rest = rest[:i] + rest[i + (2 if resume == "auto" else 1) :]
    default = get_preset(name)
    if "-h" in rest or "--help" in rest:
        print(train_help(name, default))
        return
    rest = ["--help" if a == "--help-all" else a for a in rest]
    cfg = tyro.cli(type(default), default=default, args=rest, prog=f"rewardflow train {name}")
    # tyro rebuilds nested dataclasses field by field; re-run the cross-field checks on the result.
    cfg.__post_init__()
    from rewardflow.utils import distributed

    try:
        run = train(cfg, resume=resume, preset=name)
        distributed.barrier()  # leave together: a rank tearing gloo down while rank 0 still evaluates can abort
    finally:
        distributed.shutdown()
    print(f"run folder: {run}")


def _cmd_eval(argv: list[str]) -> None:
    import dataclasses

    from rewardflow.evaluate import EvalConfig, evaluate, format_table, headline, load_reference
    from rewardflow.models.config import ModelConfig
    from rewardflow.shapes.tiny_dit import load_policy
    from rewardflow.train import BASE_REFERENCE
    from rewardflow.utils.logging import save_grid

    args = tyro.cli(EvalArgs, args=argv, prog="rewardflow eval")
    chosen = [x for x in (args.run_dir, args.base or None, args.checkpoint) if x]
    if len(chosen) != 1:
        raise ValueError("give exactly one of --run-dir DIR, --base, --checkpoint FILE")
    base_eval, reward_cfg = EvalConfig(), None
    if args.run_dir:
        from rewardflow.build import load_trained_policy

        policy, cfg = load_trained_policy(args.run_dir, device=args.device)
        base_eval, reward_cfg = cfg.eval, cfg.reward
    else:
        device = ModelConfig(device=args.device or "cpu").resolved_device()
        policy = load_policy(args.checkpoint or "base", autocast=True, device=device)
    fields = ("prompts", "samples_per_prompt", "num_steps", "guidance_scale", "solver", "seed", "rewards")
    overrides = {k: getattr(args, k) for k in fields}
    eval_cfg = dataclasses.replace(base_eval, **{k: v for k, v in overrides.items() if v is not None})
    # A run keeps its base model's evaluation images: same settings, and the drift from the base is reported.
    reference = load_reference(Path(args.run_dir) / BASE_REFERENCE, eval_cfg) if args.run_dir else None
    report, images = evaluate(policy, eval_cfg, reward_cfg, reference=reference)
    text = json.dumps(report, indent=2)
    out = args.out or (str(Path(args.run_dir) / "eval" / "final.json") if args.run_dir else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"{format_table(report)}\n{headline(report)}  -> {out}")
    else:
        print(text)
    if args.grid:
        save_grid(images.samples, Path(args.grid))


def _cmd_pretrain(argv: list[str]) -> None:
    from rewardflow.shapes.pretrain import PretrainConfig, pretrain

    cfg = tyro.cli(PretrainConfig, args=argv, prog="rewardflow pretrain")
    print(f"checkpoints in {pretrain(cfg)}")


def _cmd_reward_model(argv: list[str]) -> None:
    from rewardflow.shapes.scorer_training import ScoreTrainConfig, train_scorer

    cfg = tyro.cli(ScoreTrainConfig, args=argv, prog="rewardflow reward-model")
    report = train_scorer(cfg)
    print(
        f"held-out agreement with the judge: pearson {report['pearson']:.3f}, same-prompt pairs ordered alike "
        f"{report['pair_agreement']:.3f} of {report['pairs']} -> {cfg.out}"
    )


@dataclass
class ServeArgs:
    """Serve a registered reward over HTTP (JSON with PNG images; rewardflow/rewards/server.py; the server extra)."""

    name: tyro.conf.Positional[str]
    """The registered reward to serve (shapes-judge, ocr, pickscore, ...)."""
    host: str = "127.0.0.1"
    """Interface to bind; anything but loopback exposes the reward to the network (use a token there)."""
    port: int = 18085
    """0: any free port (the address is printed)."""
    token_env: str = ""
    """Environment variable holding a bearer token the clients must send (none: no token checked)."""
    limits: ServerLimits = dataclasses.field(default_factory=ServerLimits)
    """What a request, and the server, may cost."""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """Settings the reward is built with (its model folders, device)."""


def _cmd_serve_reward(argv: list[str]) -> None:
    import os

    from rewardflow.rewards import REWARDS

    args = tyro.cli(ServeArgs, args=argv, prog="rewardflow serve-reward")
    if args.name not in REWARDS or args.name == "remote":
        raise ValueError(
            f"cannot serve {args.name!r}; registered rewards: {', '.join(n for n in REWARDS if n != 'remote')}"
        )
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    token = os.environ.get(args.token_env) if args.token_env else None
    if args.token_env and not token:
        raise ValueError(f"--token-env names {args.token_env!r}, but that environment variable is not set")
    from rewardflow.rewards.server import RewardServer

    try:
        server = RewardServer(REWARDS[args.name](args.reward), args.host, args.port, token, args.limits)
    except OSError as err:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from err
    print(f"serving {args.name} on {server.url} (POST /score, GET /health); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.socket.close()


@dataclass
class ReportArgs:
    """Write one self-contained HTML page about a run folder: curves, samples, final evaluation, config."""

    run_dir: tyro.conf.Positional[str]
    """The run folder (as written by ``rewardflow train``)."""
    out: str | None = None
    """Where to write the page (default: RUN_DIR/report.html)."""


def _cmd_report(argv: list[str]) -> None:
    from rewardflow.report import write_report

    args = tyro.cli(ReportArgs, args=argv, prog="rewardflow report")
    print(f"report: {write_report(args.run_dir, args.out)}")


@dataclass
class ExportArgs:
    """Write a run's trained weights in the diffusers layout, with a model card (LoRA, or the whole network)."""

    run_dir: tyro.conf.Positional[str]
    """The run folder (model.kind sd3, flux or sd1)."""
    out: str
    """A new (or empty) folder to write."""
    iteration: int | None = None
    """Which saved iteration (checkpoints/iter_*.safetensors); default: the newest."""
    device: str = "cpu"
    """Where to build the model while exporting."""


def _cmd_export(argv: list[str]) -> None:
    from rewardflow.export import export_run

    args = tyro.cli(ExportArgs, args=argv, prog="rewardflow export")
    print(f"exported: {export_run(args.run_dir, args.out, args.iteration, args.device)}")


def _cmd_presets(argv: list[str]) -> None:
    from rewardflow.presets import PRESETS

    for name, fn in PRESETS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        print(f"{name:27s} {doc}")


COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "pretrain": _cmd_pretrain,
    "reward-model": _cmd_reward_model,
    "serve-reward": _cmd_serve_reward,
    "report": _cmd_report,
    "export": _cmd_export,
    "presets": _cmd_presets,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rewardflow`` console script; returns the exit status (2 on bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from rewardflow.run_state import TrainingStopped
    from rewardflow.utils.errors import RunFailed

    try:
        COMMANDS[argv[0]](argv[1:])
    except (ValueError, PromptError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingStopped as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print("interrupted: stopped at once; the checkpoints saved before are intact (--resume continues)",
              file=sys.stderr)  # fmt: skip
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
