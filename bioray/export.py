"""Take the model away: a checkpoint as a clean adapter folder, or merged into its base.

- Adapter (default): the files peft and multi-LoRA servers read (``adapter_model.safetensors``,
  ``adapter_config.json``), the tokenizer and ``bioray.yaml``; nothing of the trainer's.
- Merged (``merge=True``): LoRA folded into the base weights (peft's ``merge_and_unload``) and
  saved as a plain Hugging Face folder (safetensors, config, generation config, tokenizer) that
  ``AutoModelForCausalLM.from_pretrained`` loads without peft.

Both are written into a temporary folder beside ``out`` and renamed into place, so ``out`` is
either absent or complete.

A checkpoint may come from someone else: what the merge loads and how (the base model, whether its
code may run, pickle weights, the hub revision) comes from the caller, never from the checkpoint's
own files. The checkpoint's base is only checked against the one the caller names.
"""

from __future__ import annotations

import logging
import os
import shutil
from fnmatch import fnmatch
from pathlib import Path
from typing import Optional

from bioray import tempdirs
from bioray.checkpoint import (ADAPTER_FILES, CONFIG_FILE, check_base, check_base_exists, check_revision,
                               checkpoint_base, is_full, verify)
from bioray.config import Config, ModelSection
from bioray.errors import ConfigError, OutputError
from bioray.storage import is_uri, local_copy

log = logging.getLogger("bioray")

TMP_NAME = ".bioray-export"  # an export in progress, beside --out (bioray.tempdirs naming)
# Tokenizer files any tokenizer class may have saved (fast, sentencepiece, BPE vocab, chat template).
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "chat_template.*", "*.model")


def export_checkpoint(checkpoint: str | Path, out: str | Path, merge: bool = False,
                      expected_base: str | None = None, model: Optional[ModelSection] = None) -> Path:
    """Writes the checkpoint's adapter folder, or the merged model, to ``out``.

    Args:
        checkpoint: A checkpoint folder (``run.dir/checkpoints/step-*``), or its URI on ``run.storage``.
        out: The folder to create; it must not exist or be empty.
        merge: Merge LoRA into the base and save a plain model folder.
        expected_base: The base model the checkpoint must have been trained on: a hub id or folder
            (matched against the adapter's base) or a ``model.name_or_path`` such as ``tiny``
            (matched against the checkpoint's ``bioray.yaml``); None = no check, which ``merge``
            does not allow.
        model: How the merge may load the base (``trust_remote_code``, ``allow_pickle``,
            ``revision``): the caller's config, never the checkpoint's; None = the safe defaults.

    Returns:
        ``out`` as an absolute path.

    Raises:
        CheckpointError: an incomplete checkpoint, one made for another base, or a base folder
            that no longer exists (merge).
        ConfigError: ``merge`` without ``expected_base``; a base folder with pickle weights only.
        OutputError: ``out`` is a file or a non-empty folder, or cannot be written.
    """
    dest = Path(out).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OutputError(f"{dest}: already exists and is not an empty folder; choose a new --out")
    source = str(checkpoint) if is_uri(str(checkpoint)) else str(Path(checkpoint).resolve())
    if merge and expected_base is None:
        made_for = "" if is_uri(source) else f" ({Path(source).name} was made for {checkpoint_base(source)!r})"
        raise ConfigError(f"--merge needs --base MODEL: the base model to merge into, which the checkpoint must "
                          f"have been made for{made_for}")
    tempdirs.clean_stale(dest.parent, TMP_NAME)
    try:
        tmp = tempdirs.make(dest.parent, TMP_NAME)
    except OSError as e:
        raise OutputError(f"{dest}: cannot write there ({e.strerror}); choose another --out") from None
    try:
        # A folder, or a URI on run.storage (downloaded to a temporary folder first).
        with local_copy(source) as ckpt:
            _export(ckpt, tmp, merge, expected_base, model or ModelSection())
        if dest.exists():
            dest.rmdir()  # empty (checked above); rename needs the name free
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s -> %s (%s)", checkpoint, dest, "merged" if merge else "adapter")
    return dest


def _export(ckpt: Path, tmp: Path, merge: bool, expected_base: str | None, model: ModelSection) -> None:
    """Writes the export of a local checkpoint folder into ``tmp``."""
    # Checks the files are the ones training wrote, the folder is complete, and (given a base)
    # that it was made for that base.
    verify(ckpt)
    base = checkpoint_base(ckpt) if expected_base is None else check_base(ckpt, expected_base)
    full = is_full(ckpt)
    if merge and not full:
        _merge(ckpt, base, tmp, model)
    else:
        if merge:
            log.info("%s holds full weights (train.full_finetune); nothing to merge, copying it", ckpt)
        weights = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json") \
            if full else ADAPTER_FILES
        _copy(ckpt, tmp, (*weights, "README.md"))
    _copy(ckpt, tmp, (*TOKENIZER_PATTERNS, CONFIG_FILE))


def _merge(ckpt: Path, base: str, out: Path, model_section: ModelSection) -> None:
    """Base + adapter -> one model, saved in the base's own dtype."""
    from bioray.model import check_model_folder, local_model

    # The caller's loading settings; the checkpoint's bioray.yaml is copied, never obeyed.
    cfg = Config(model=model_section)
    check_base_exists(ckpt, base)
    check_revision(ckpt, cfg.model.revision, "config key 'model.revision'")
    folder = local_model(base)
    if folder is not None:
        check_model_folder(folder, cfg, f"{ckpt}: its base model")
    import torch
    from peft import PeftModel

    from bioray.model import load_base, load_tokenizer

    # Merge in fp32 (W + B @ A * scale, rounded once), then store in the dtype the base ships in.
    model = load_base(base, cfg, dtype=torch.float32)
    saved_dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    merged = PeftModel.from_pretrained(model, str(ckpt)).merge_and_unload()
    if isinstance(saved_dtype, torch.dtype) and saved_dtype in (torch.bfloat16, torch.float16):
        merged = merged.to(saved_dtype)
    tokenizer = load_tokenizer(str(ckpt), cfg)
    gen = merged.generation_config
    # What greedy generation needs to stop and pad, in the folder itself.
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                            tokenizer.pad_token_id)
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(str(out), safe_serialization=True)


def _copy(src: Path, dst: Path, patterns: tuple[str, ...]) -> None:
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(".") and any(fnmatch(f.name, p) for p in patterns):
            shutil.copy2(f, dst / f.name)

