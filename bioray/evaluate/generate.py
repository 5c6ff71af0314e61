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
        if _norm(base) != _norm(self.base_path):
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


def _norm(path: str) -> str:
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path
