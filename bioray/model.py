"""Base models: the embedded `tiny` Llama, loading any causal LM, and attaching LoRA.

``tiny`` is built once per (corpus, shape) and cached as an ordinary Hugging Face folder, then
loaded through ``AutoModelForCausalLM``/``AutoTokenizer`` like a hub id or a local folder, so the
quickstart exercises the same code path as Llama-2-7B.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from bioray import tempdirs
from bioray.config import CHAT_TEMPLATE, Config
from bioray.corpus.templates import has_chat_template
from bioray.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("bioray")

TINY_VERSION = "1"
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
TINY_TMP = ".tiny-tmp"  # a tiny base being built (bioray.tempdirs naming)
# Weights that load without running code, and the pickle formats that can run code when loaded.
SAFE_WEIGHTS = "*.safetensors"
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def cache_root(cfg: Config) -> Path:
    """The folder that holds tokenised caches and built tiny models."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser().resolve()
    env = os.environ.get("BIORAY_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bioray"


def resolve_base(cfg: Config, corpus_dir: Path) -> str:
    """The ``from_pretrained`` path of the base model: a hub id, a folder, or the built tiny model.

    Args:
        cfg: The run's config.
        corpus_dir: The built corpus (the tiny tokenizer and pretraining read its train split).

    Raises:
        ConfigError: a local-looking path that does not exist.
    """
    name = cfg.model.name_or_path
    if name == "tiny":
        return str(build_tiny(cfg, corpus_dir))
    local = local_model(name)
    if local is not None:
        check_model_folder(local, cfg, "config key 'model.name_or_path'")
        return str(local)
    return name


def local_model(name: str) -> Optional[Path]:
    """The folder ``model.name_or_path`` names, or None for a hub id (and for ``tiny``).

    Raises:
        ConfigError: a local-looking path (``./``, ``/``, ``~``) that does not exist.
    """
    if name == "tiny":
        return None
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve()
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"config key 'model.name_or_path': folder {name!r} does not exist")
    return None


def check_model_folder(folder: Path, cfg: Config, named_by: str) -> None:
    """Checks a local model folder before anything loads it: a Hugging Face model with a tokenizer,
    whose weights load without running code (safetensors), unless ``model.allow_pickle`` says otherwise.

    Args:
        folder: The model folder.
        cfg: The run's config (``model.allow_pickle``).
        named_by: Where the folder came from (a config key, a flag), for the error.

    Raises:
        ConfigError: no config.json, no tokenizer (or no chat template where ``corpus.template`` is chat),
            pickle weights only, or no weights.
    """
    if not folder.is_dir():
        raise ConfigError(f"{named_by}: {folder} is not a folder (expected a Hugging Face model folder)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{named_by}: {folder} has no config.json (not a Hugging Face model folder)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{named_by}: {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    if cfg.corpus.template == CHAT_TEMPLATE and not has_chat_template(folder):
        raise ConfigError(f"{named_by}: {folder}'s tokenizer has no chat template, which corpus.template: chat needs "
                          f"(use a chat/instruct model, or a layout with {{instruction}} and {{input}})")
    if any(folder.glob(SAFE_WEIGHTS)):
        return
    pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if not pickled:
        raise ConfigError(f"{named_by}: {folder} holds no model weights ({SAFE_WEIGHTS})")
    if not cfg.model.allow_pickle:
        raise ConfigError(f"{named_by}: {folder} holds pickle weights only ({pickled[0]}), which can run code when "
                          f"loaded; convert them to safetensors, or set model.allow_pickle: true if you trust them")


def load_tokenizer(path: str, cfg: Config):
    """Loads a tokenizer and gives it a pad token (left padding is set where generation needs it).

    ``trust_remote_code`` and ``revision`` come from the config the job was given (never from a
    checkpoint's own files).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code,
                                        revision=_revision(path, cfg))
    if tok.pad_token_id is None:
        # Llama-2 ships without a pad token; EOS is the common stand-in and labels mask it anyway.
        tok.pad_token = tok.eos_token
    return tok


def load_base(path: str, cfg: Config, dtype: Optional[torch.dtype] = None):
    """Loads a causal LM on CPU (fp32 unless ``dtype``), from safetensors only unless ``model.allow_pickle``."""
    import torch
    from transformers import AutoModelForCausalLM

    # use_safetensors=True: transformers refuses *.bin instead of falling back to torch.load.
    extra = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=None if cfg.model.allow_pickle else True, revision=_revision(path, cfg), **extra,
    )


def _revision(path: str, cfg: Config) -> Optional[str]:
    """``model.revision`` for the hub id it pins; a local folder (a checkpoint, the tiny base) has none."""
    return cfg.model.revision if path == cfg.model.name_or_path and local_model(path) is None else None


def safetensors_complete(path: Path) -> bool:
    """Whether a safetensors file is whole: its header parses and its tensors end where the file does.

    A write that was cut short (a full disk, a killed process) fails this without reading the
    tensors; a flipped byte inside them does not (that takes a checksum).
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def add_lora(model, cfg: Config):
    """Wraps ``model`` with a peft LoRA adapter described by ``cfg.lora``."""
    from peft import LoraConfig, get_peft_model

    save = list(cfg.lora.modules_to_save)
    modules = dict(model.named_modules())
    unknown = [m for m in save if m not in {name.rsplit(".", 1)[-1] for name in modules}]
    if unknown:  # peft would train nothing and say nothing
        embedding = next(name.rsplit(".", 1)[-1] for name, m in modules.items() if m is model.get_input_embeddings())
        raise ConfigError(f"config key 'lora.modules_to_save': the model has no module named {unknown[0]!r} "
                          f"(the embedding is {type(model.get_input_embeddings()).__name__} {embedding!r})")
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        modules_to_save=save or None,
        # A tied head (the tiny base's lm_head is its embedding) must stay the trained embedding.
        ensure_weight_tying=bool(save) and bool(getattr(model.config, "tie_word_embeddings", False)),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:  # peft names the modules it could not find
        raise ConfigError(f"config key 'lora.target_modules': {e}".splitlines()[0]) from None


# ---------------------------------------------------------------------------- tiny model


def _tiny_key(cfg: Config, corpus_hash: str) -> str:
    parts = {
        "version": TINY_VERSION,
        "corpus": corpus_hash,
        "tiny": dataclasses.asdict(cfg.model.tiny),
        "template": cfg.corpus.template,
        "max_seq_len": cfg.data.max_seq_len,
        "seed": cfg.run.seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build_tiny(cfg: Config, corpus_dir: Path) -> Path:
    """Builds (once) and returns the folder of the tiny base model for this corpus.

    A byte-level BPE tokenizer is trained on the corpus's train split, a small Llama is
    initialised and pretrained on it (``model.tiny.pretrain_on``: the records' inputs, never their
    answers, by default; or their full text, prompt and answer), and both are saved as a Hugging
    Face folder. Cached by a hash of everything that shapes it.
    """
    from bioray.corpus import read_manifest

    manifest = read_manifest(corpus_dir)
    out = cache_root(cfg) / "models" / f"tiny-{_tiny_key(cfg, manifest['content_hash'])}"
    if (out / "config.json").is_file():
        if safetensors_complete(out / "model.safetensors"):
            log.info("tiny base model up to date: %s", out)
            return out
        # Cut short (a full disk, a copy of the cache that stopped): build it again, not fail every run.
        log.warning("%s is incomplete; building the tiny base again", out / "model.safetensors")
        shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tempdirs.clean_stale(out.parent, TINY_TMP)
    what = cfg.model.tiny.pretrain_on
    texts = _corpus_texts(cfg, corpus_dir, manifest, what)
    # The tokenizer also learns the instructions' words (never an answer): trained on the inputs
    # alone it splits them into bytes, and the quickstart's prompts grew from 66 to 152 tokens.
    vocab_texts = texts if what in ("prompts", "records") else _corpus_texts(cfg, corpus_dir, manifest, "prompts")
    tmp = tempdirs.make(out.parent, TINY_TMP)
    try:
        tokenizer = _train_tokenizer(vocab_texts, cfg.model.tiny.vocab_size, cfg.model.tiny.pre_tokenizer)
        model = _init_tiny(cfg, tokenizer)
        _pretrain(model, tokenizer, texts, cfg)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():
            raise
        log.info("another process built the same tiny model first: %s", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _corpus_texts(cfg: Config, corpus_dir: Path, manifest: dict, what: Optional[str] = None) -> list[str]:
    """The train split's text the tiny base learns from: ``what`` (default ``model.tiny.pretrain_on``).

    ``inputs``, ``twice`` and ``prompts`` hold no answer: a base pretrained on the answers already
    does the task (every quickstart checkpoint scored 100.00 and the loss started at 0.013), so the
    scores would show nothing fine-tuning did. ``twice`` writes each input, a line break and the
    input again: the second copy is predictable only by copying, the skill an NER answer (the
    input's words, one per line) needs and a base that only read sentences lacks (docs/real-data.md).
    """
    from bioray.corpus import read_records, render_prompt

    what = what or cfg.model.tiny.pretrain_on
    texts = []
    for source, info in sorted(manifest["sources"].items()):
        if "train" not in info["splits"]:
            continue
        for r in read_records(corpus_dir, source, "train"):
            if what in ("inputs", "twice"):
                texts.append(r["input"] if what == "inputs" else f"{r['input']}\n{r['input']}")
                continue
            prompt = render_prompt(cfg.corpus.template, r["instruction"], r["input"])
            texts.append(prompt if what == "prompts" else prompt + r["output"])
    if not texts:
        raise ConfigError("model.name_or_path: tiny needs a corpus with a train split to learn from")
    return texts


# model.tiny.pre_tokenizer values that split words apart before the byte-level BPE (the regex of
# each; bytelevel, GPT-2's split, is the other one). A word must be the same tokens wherever it
# stands: GPT-2's pre-tokenizer glues the space before a word to it (" associated"), so the word at
# a line's start ("associated : O", an NER answer line) is other tokens (ass|oci|ated), and copying
# it from the input means learning its spelling: a base that never saw an answer did not, in
# minutes (answer loss stuck near 2.1, F1 0.00 on real NER; docs/real-data.md).
WORD_SPLITS = {
    # Letters, digits, other symbols (with the space before them) and white space apart.
    "words": r"\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+|\s+",
    # The same with the space after a word glued to it ("associated "): one pre-token in the
    # sentence and at an answer line's start, and 25% fewer tokens than `words` on the real
    # corpora. Same base, same 900 steps on real NER: F1 0.00 with `words`, 0.57 with this.
    "trailing_space": r"\p{L}+ ?|\p{N}+ ?|[^\s\p{L}\p{N}]+ ?|\s+",
}


def _train_tokenizer(texts: list[str], vocab_size: int, pre_tokenizer: str = "bytelevel"):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if pre_tokenizer in WORD_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORD_SPLITS[pre_tokenizer]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:  # bytelevel: GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        # Without the full byte alphabet, characters absent from the corpus could never be
        # encoded later (measured here; see FACTS.md).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def _init_tiny(cfg: Config, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.model.tiny
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        intermediate_size=int(t.hidden_size * 8 / 3 // 64 * 64) or 64,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=cfg.data.max_seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.run.seed)
    return LlamaForCausalLM(config)


def _restarting_positions(starts: list[int], n: int, seq: int):
    """Position ids for ``n`` packed tokens cut into rows of ``seq``: 0 at every text's start and
    at every row's start (a text cut by a row's end goes on as a fresh sequence)."""
    import torch

    first = torch.zeros(n, dtype=torch.bool)
    first[torch.tensor([s for s in starts if s < n], dtype=torch.long)] = True
    first[::seq] = True
    index = torch.arange(n)
    return (index - torch.cummax(torch.where(first, index, 0), 0).values).view(-1, seq)


def _pretrain(model, tokenizer, texts: list[str], cfg: Config) -> None:
    """Full-parameter causal-LM pretraining on the corpus text, packed into fixed-length rows.

    With ``model.tiny.pretrain_packing: isolated`` each text's positions restart at 0, and
    transformers then lets a token attend only to its own text (the block-diagonal mask
    ``bioray.data.collate`` relies on too).
    """
    import torch

    from bioray.optim import lr_schedule

    t = cfg.model.tiny
    ids: list[int] = []
    starts: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        starts.append(len(ids))
        ids += [tokenizer.bos_token_id, *enc, tokenizer.eos_token_id]
    seq = min(256, cfg.data.max_seq_len)
    n = len(ids) // seq * seq
    rows = torch.tensor(ids[:n]).view(-1, seq)
    if len(rows) == 0:
        raise ConfigError("model.name_or_path: tiny needs more corpus text than one sequence")
    positions = None
    if t.pretrain_packing == "isolated":
        positions = _restarting_positions(starts, n, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=t.pretrain_lr, weight_decay=0.01)
    sched = lr_schedule(opt, max(1, t.pretrain_steps // 20), t.pretrain_steps)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    model.train()
    start, last_log = time.time(), time.time()
    for step in range(t.pretrain_steps):
        pick = torch.randint(len(rows), (t.pretrain_batch_size,), generator=gen)
        batch = rows[pick]
        extra = {} if positions is None else {"position_ids": positions[pick]}
        loss = model(input_ids=batch, labels=batch, use_cache=False, **extra).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if not cfg.run.quiet and (time.time() - last_log > 10 or step + 1 == t.pretrain_steps):
            last_log = time.time()
            elapsed = last_log - start
            eta = elapsed / (step + 1) * (t.pretrain_steps - step - 1)
            log.info("pretraining tiny base: step %d/%d loss %.3f (%.0fs, ETA %.0fs)",
                     step + 1, t.pretrain_steps, loss.item(), elapsed, eta)
    model.eval()
