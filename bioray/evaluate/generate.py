"""Answer generation for scoring: one base model loaded once, LoRA adapters swapped per checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from bioray.config import Config
from bioray.errors import CheckpointError

log = logging.getLogger("bioray")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer_config.json",)


def checkpoint_base(directory: str | Path) -> str:
    """The base model a checkpoint was trained on, after checking the folder is complete.

    Raises:
        CheckpointError: a missing folder or file, or an unreadable adapter config.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint folder not found")
    full = (d / "config.json").is_file() and not (d / "adapter_config.json").is_file()
    needed = (("config.json", "model.safetensors") if full else ADAPTER_FILES) + TOKENIZER_FILES + ("bioray.yaml",)
    for name in needed:
        if not (d / name).is_file():
            raise CheckpointError(f"{d}: incomplete checkpoint, {name} is missing")
    if full:
        return str(d.resolve())
    try:
        base = json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (ValueError, KeyError):
        raise CheckpointError(f"{d / 'adapter_config.json'}: no base_model_name_or_path in it") from None
    return base


class Generator:
    """Holds a base model and tokenizer; ``use(checkpoint)`` swaps in that checkpoint's adapter."""

    def __init__(self, base_path: str, cfg: Config, device: str = "cpu"):
        from bioray.model import load_base, load_tokenizer

        self.base_path, self.cfg, self.device = base_path, cfg, device
        self.tokenizer = load_tokenizer(base_path, cfg)
        # Decoder-only generation continues from the right end: pad on the left.
        self.tokenizer.padding_side = "left"
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.base = load_base(base_path, cfg, dtype=dtype).to(device).eval()
        self.model = self.base
        self._adapter: str | None = None
        self._n = 0

    def use(self, checkpoint_dir: str | Path) -> None:
        """Makes the adapter in ``checkpoint_dir`` the active one (the base stays loaded).

        Raises:
            CheckpointError: incomplete folder, or made for another base model.
        """
        from peft import PeftModel

        base = checkpoint_base(checkpoint_dir)
        if base_key(base) != base_key(self.base_path):
            raise CheckpointError(f"{checkpoint_dir}: checkpoint was made for base model {base!r}, "
                                  f"not {self.base_path!r}")
        name = f"ckpt{self._n}"
        self._n += 1
        if self._adapter is None:
            self.model = PeftModel.from_pretrained(self.base, str(checkpoint_dir), adapter_name=name).eval()
        else:
            self.model.load_adapter(str(checkpoint_dir), adapter_name=name)
            self.model.set_adapter(name)
            self.model.delete_adapter(self._adapter)
        self._adapter = name
        self.model.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: list[int], batch_size: int, num_beams: int = 1) -> list[str]:
        """Greedy (or beam) answers for rendered prompts, in the order given.

        Prompts are batched by length so little padding is generated over; each batch stops at
        the longest ``max_new_tokens`` of its members or when all have produced EOS.
        """
        from bioray.data import encode_prompt

        ids = encode_prompt(self.tokenizer, prompts)
        order = sorted(range(len(prompts)), key=lambda k: len(ids[k]))
        out: list[str] = [""] * len(prompts)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(ids[k]) for k in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, k in enumerate(chunk):
                input_ids[row, width - len(ids[k]):] = torch.tensor(ids[k])
                mask[row, width - len(ids[k]):] = 1
            gen = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=max(max_new_tokens[k] for k in chunk), do_sample=False, num_beams=num_beams,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad,
            )
            for row, k in enumerate(chunk):
                out[k] = self.tokenizer.decode(gen[row, width:], skip_special_tokens=True)
        return out

    @torch.no_grad()
    def constrained(self, prompts: list[str], specs: list, max_new_tokens: list[int], batch_size: int,
                    num_beams: int = 1) -> list[str]:
        """Answers that always parse (``eval.decoding: constrained``), in the order given.

        Each record's :class:`~bioray.evaluate.constrained.AnswerSpec` picks the method: tags and
        lists are decoded greedily within their grammar, choices are scored by log-likelihood, and
        records without an answer space (``kind == "free"``) are generated freely.

        Args:
            prompts: Rendered prompts.
            specs: One answer spec per prompt (``bioray.evaluate.pool.answer_specs``).
            max_new_tokens: Length caps; used by free records only (grammars end by themselves).
            batch_size: Prompts per batch, for every method.
            num_beams: Beam width of free records; constrained methods are greedy.

        Returns:
            The answer texts.
        """
        from bioray.data import encode_prompt
        from bioray.evaluate.constrained import best_choice, decode_grammar, grammar_for

        out: list[str] = [""] * len(prompts)
        groups: dict[str, list[int]] = {}
        for k, spec in enumerate(specs):
            groups.setdefault("grammar" if spec.kind in ("tags", "list") else spec.kind, []).append(k)
        ids = encode_prompt(self.tokenizer, prompts)
        if groups.get("grammar"):
            ks = groups["grammar"]
            walkers = decode_grammar(self.model, [ids[k] for k in ks],
                                     [grammar_for(self.tokenizer, specs[k]) for k in ks], batch_size,
                                     self.tokenizer.pad_token_id, self.device)
            for k, w in zip(ks, walkers):
                out[k] = w.answer
            _check_canonical(self.tokenizer, walkers)
        if groups.get("choice"):
            ks = groups["choice"]
            best = best_choice(self.tokenizer, self.model, [ids[k] for k in ks], [specs[k].labels for k in ks],
                               batch_size, self.device)
            for k, answer in zip(ks, best):
                out[k] = answer
        if groups.get("free"):
            ks = groups["free"]
            free = self.generate([prompts[k] for k in ks], [max_new_tokens[k] for k in ks], batch_size, num_beams)
            for k, answer in zip(ks, free):
                out[k] = answer
        return out


def _check_canonical(tokenizer, walkers) -> None:
    """Warns where a constrained answer's tokens are not its text's own tokenisation.

    Only a tokenizer that merges across answer lines and changes earlier tokens when a line is
    added can cause that (see ``bioray.evaluate.constrained``); the answers still parse.
    """
    encoded = tokenizer([w.answer for w in walkers], add_special_tokens=False)["input_ids"]
    off = sum(ids + [tokenizer.eos_token_id] != w.ids for ids, w in zip(encoded, walkers))
    if off:
        log.warning("%d of %d constrained answers are not tokenised as training tokenises their text; "
                    "this tokenizer merges across answer lines", off, len(walkers))


def base_key(path: str) -> str:
    """A base model's identity for comparison: the resolved folder if it exists, else the hub id."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path
