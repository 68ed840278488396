"""A run's trained weights in the diffusers layout, with a model card: what a plain diffusers pipeline loads.

LoRA runs export the adapter as ``pipe.load_lora_weights`` reads it (``pytorch_lora_weights.safetensors`` with its
rank, alpha and targets); full fine-tunes export the trained network's folder (``transformer/`` or ``unet/``), to
pass to the pipeline's ``from_pretrained``. ``README.md`` says what it is and how to load it. The training loop
writes ``RUN_DIR/diffusers/`` at each save (the newest only); ``rewardflow export`` writes any saved iteration.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from rewardflow.config import TrainConfig, read_run_config
from rewardflow.evaluate import headline
from rewardflow.models.protocol import FlowPolicy

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "sd1": "StableDiffusionPipeline"}
NETWORKS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel", "sd1": "UNet2DConditionModel"}


def exportable(cfg: TrainConfig) -> bool:
    """Whether the run's model has a diffusers pipeline layout to export to (every saved run writes ``diffusers/``)."""
    return cfg.model.kind in PIPELINES


def _check_exportable(cfg: TrainConfig, run: Path) -> None:
    if not exportable(cfg):
        raise ValueError(
            f"run {run} trained model.kind {cfg.model.kind!r}: export writes diffusers layouts (model.kind sd3, flux "
            "or sd1); the tiny DiT's weights are its checkpoints/iter_*.safetensors already"
        )


def last_evaluation(run: Path, iteration: int) -> tuple[int, dict[str, Any]] | None:
    """The newest evaluation report of ``run`` at or before ``iteration``, with its iteration."""
    found = []
    for path in (run / "eval").glob("iter_*.json"):
        at = int(path.stem.removeprefix("iter_"))
        if at <= iteration:
            found.append((at, path))
    if not found:
        return None
    at, path = max(found)
    return at, json.loads(path.read_text())


def model_card(cfg: TrainConfig, run: Path, iteration: int, lora: bool) -> str:
    """A short README: the base model, the method and preset, the iteration, the last evaluation, how to load it."""
    meta_path = run / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    pipeline, net = PIPELINES[cfg.model.kind], "unet" if cfg.model.kind == "sd1" else "transformer"
    base = str(Path(cfg.model.path).resolve()) if Path(cfg.model.path).exists() else cfg.model.path
    evaluation = last_evaluation(run, iteration)
    seen = f"iteration {evaluation[0]}: {headline(evaluation[1])}" if evaluation else "none saved"
    if lora:
        load = (f'pipe = {pipeline}.from_pretrained("{base}")\n'
                'pipe.load_lora_weights("THIS_FOLDER")')  # fmt: skip
        weights = f"LoRA rank {cfg.model.lora_rank}, alpha {cfg.model.lora_alpha or 2 * cfg.model.lora_rank:g}"
    else:
        cls = NETWORKS[cfg.model.kind]
        load = (f'{net} = {cls}.from_pretrained("THIS_FOLDER/{net}")\n'
                f'pipe = {pipeline}.from_pretrained("{base}", {net}={net})')  # fmt: skip
        weights = f"the whole {net} (full fine-tune)"
    return "\n".join([
        f"# {run.name}: {cfg.algorithm} on {cfg.model.path}",
        "",
        f"- base model: `{base}` ({pipeline})",
        f"- method: `{cfg.algorithm}`; preset: `{meta.get('preset') or 'not recorded'}`; rewards: "
        f"{', '.join(cfg.reward.names)}",
        f"- weights: {weights}: "
        + ("the trained weights" if cfg.ema_decay == 0 else f"their EMA (decay up to {cfg.ema_decay:g})")
        + f" at iteration {iteration} of {cfg.iterations}, trained at "
        + (f"{cfg.model.resolution} px" if cfg.model.resolution else "the model's native size"),
        f"- last evaluation: {seen}",
        f"- trained with rewardflow {meta.get('rewardflow_version', '?')} (commit {meta.get('git_commit') or '?'})",
        "",
        "```python",
        f"from diffusers import {pipeline}" + ("" if lora else f", {cls}"),
        load,
        "```",
        "",
    ])  # fmt: skip


def write_export(
    policy: FlowPolicy, cfg: TrainConfig, run: Path, iteration: int, out: Path, state: dict | None = None
) -> Path:
    """Write ``policy``'s current weights (the caller swaps the EMA in) to ``out``, replacing it as a whole.

    ``state``: the whole network's state dict, for a full fine-tune sharded over the ranks (rank 0 holds it
    gathered; its own module holds only shards). The folder is written beside ``out`` and moved into place, so a
    crash leaves the previous export intact.
    """
    from rewardflow.models.diffusers_io import save_lora
    from rewardflow.models.lora import has_lora

    lora = has_lora(policy.module)
    tmp = out.with_name(out.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    net = tmp / ("unet" if cfg.model.kind == "sd1" else "transformer")
    if lora:
        save_lora(policy, tmp)
    elif state is not None:  # the layout save_pretrained writes, from the gathered weights
        from safetensors.torch import save_file

        policy.module.save_config(net)
        save_file(
            {k: v.detach().contiguous() for k, v in state.items()}, str(net / "diffusion_pytorch_model.safetensors")
        )
    else:
        policy.module.save_pretrained(net)
    (tmp / "README.md").write_text(model_card(cfg, run, iteration, lora))
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def export_run(run_dir: str | Path, out: str | Path, iteration: int | None = None, device: str = "cpu") -> Path:
    """Export the EMA weights a run saved at ``iteration`` (default: its newest) to ``out`` (a new folder).

    Raises:
        FileNotFoundError: not a run folder, or no saved weights (at that iteration); the message lists those saved.
        FileExistsError: ``out`` exists and is not empty (nothing is overwritten).
        ValueError: the run trained the tiny DiT, which has no diffusers layout.
    """
    from rewardflow.build import build_policy
    from rewardflow.utils.checkpoint import load_trainable

    run, target = Path(run_dir), Path(out)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run folder (no config.yaml)")
    cfg = read_run_config(run)
    _check_exportable(cfg, run)
    saved = {int(p.stem.removeprefix("iter_")): p for p in (run / "checkpoints").glob("iter_*.safetensors")}
    if not saved:
        raise FileNotFoundError(f"run {run} has no saved weights yet (checkpoints/iter_*.safetensors)")
    at = max(saved) if iteration is None else iteration
    if at not in saved:
        raise FileNotFoundError(f"run {run} saved no weights at iteration {at}; saved: {sorted(saved)}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"--out {target} exists and is not empty: give a new folder (nothing is overwritten)")
    cfg.model = dataclasses.replace(cfg.model, device=device, fsdp=False)
    policy = build_policy(cfg.model, cfg.method().needs_reference)
    load_trainable(list(policy.named_trainable_state()), saved[at])
    if target.exists():
        target.rmdir()
    return write_export(policy, cfg, run, at, target)
