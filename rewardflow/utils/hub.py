"""Model paths that are a local folder or a Hugging Face Hub id, resolved through the normal Hub cache.

A Hub id is fetched once (``hf download`` does the same by hand) and later found in the cache; with
``HF_HUB_OFFLINE=1`` only the cache is read. Whatever cannot be found stops with one message naming the field,
the path and both ways to provide it.
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def model_folder(path: str | Path, field: str, pipeline: bool = False, example: str = "") -> Path:
    """``path`` as a local folder: itself if it exists, else the Hub model of that id from the cache or the Hub.

    ``pipeline``: a diffusers pipeline, fetched with ``DiffusionPipeline.download`` (only the files the pipeline
    loads, not the single-file checkpoints some repositories also hold); otherwise the whole repository.
    ``example``: a Hub id of the right kind, named in the message.

    Raises:
        FileNotFoundError: neither a local folder nor a Hub model that could be found (no network, offline mode
            with nothing cached, no such repository); the message names ``field`` and says what would work.
    """
    text = str(path)
    local = Path(text).expanduser()
    # A Hub id is owner/name; a path whose first part is a folder here (models/..., runs/...) is meant locally.
    if not text or local.exists() or not HUB_ID.fullmatch(text) or Path(text.split("/")[0]).is_dir():
        return local
    try:
        if pipeline:
            from diffusers import DiffusionPipeline

            return Path(DiffusionPipeline.download(text))
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text))
    except Exception as e:  # the Hub's errors (offline, not cached, not found, gated) all end the same way
        from huggingface_hub import constants

        why = "offline mode (HF_HUB_OFFLINE=1) and not in the cache" if constants.HF_HUB_OFFLINE else str(e)
        why = why.splitlines()[0] if why else type(e).__name__
        raise FileNotFoundError(
            f"{field} {text!r} is neither a local folder nor a Hub model that could be fetched ({why})."
            f" Where the network allows, `hf download {example or text} --local-dir {text}` makes that folder, or"
            f" `hf download {text}` fetches a Hub id into the Hub cache (used from then on)."
        ) from e


def converted_model(path: str | Path, field: str, reward: str, files: tuple[str, ...], what: str, how: str,
                    tokenizer: tuple[str, tuple[str, ...], str]) -> Path:  # fmt: skip
    """The folder of a reward model converted to transformers, checked for ``files`` and a tokenizer.

    ``what`` says what the folder must hold, ``how`` how to make it once; ``tokenizer``: its kind (CLIP, BERT), the
    file names of which one must be there, and what to do when none is. Raises FileNotFoundError naming ``field``.
    """
    root = model_folder(path, field) if path else None
    if root is None or not all((root / f).is_file() for f in files):
        raise FileNotFoundError(
            f"reward {reward!r} needs a local folder holding {what}, got {str(path)!r}. Once, where the network "
            f"allows: {how} (docs/rewards.md), and set {field} to DIR."
        )
    kind, names, fix = tokenizer
    if not any((root / f).is_file() for f in names):
        raise FileNotFoundError(
            f"reward {reward!r} needs the {kind} tokenizer in {root} ({' or '.join(names)}): {fix}"
        )
    return root
