"""Answer generation for scoring: one base model loaded once, LoRA adapters swapped per checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from bioray.config import Config
from bioray.checkpoint import check_base, is_full, saves_modules
from bioray.corpus import PromptFormat

log = logging.getLogger("bioray")

class Generator:
    """Holds a base model and tokenizer; ``use(checkpoint)`` swaps in that checkpoint's adapter."""

    def __init__(self, base_path: str, cfg: Config, device: str = "cpu", load_from: str | None = None):
        """``base_path`` is the base checkpoints must be made for; ``load_from`` a copy of it on this node
        (a download from run.storage), if it is not at ``base_path`` here."""
        from bioray.model import load_base, load_tokenizer

        self.base_path, self.cfg, self.device = base_path, cfg, device
        self.load_from = load_from or base_path
        self.tokenizer = load_tokenizer(self.load_from, cfg)
        # Decoder-only generation continues from the right end: pad on the left.
        self.tokenizer.padding_side = "left"
        self.format = PromptFormat(cfg.corpus.template, self.tokenizer, cfg.corpus.system_prompt)
        self.dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.base = load_base(self.load_from, cfg, dtype=self.dtype).to(device).eval()
        self.model = self.base
        self._adapter: str | None = None
        self._n = 0

    def use(self, checkpoint_dir: str | Path) -> None:
        """Makes the checkpoint in ``checkpoint_dir`` the one that answers.

        An adapter is swapped in on the loaded base (the previous one is deleted); full weights
        (``train.full_finetune``) are loaded as a model of their own, the base left as it is.

        Raises:
            CheckpointError: incomplete folder, or made for another base model.
        """
        from peft import PeftModel

        from bioray.model import load_base

        check_base(checkpoint_dir, self.base_path)
        if is_full(checkpoint_dir):
            self.model = self.base = self._adapter = None  # free the previous weights first
            self.model = load_base(str(checkpoint_dir), self.cfg, dtype=self.dtype).to(self.device).eval()
            return
        swap_unsafe = self._adapter is not None and (
            saves_modules(checkpoint_dir) or bool(self.model.peft_config[self._adapter].modules_to_save))
        if self.base is None or swap_unsafe:
            # The previous checkpoint was full weights, or an adapter with modules trained whole
            # (lora.modules_to_save): peft's adapter swap kept the previous modules' weights there
            # (every answer scored 0), so such adapters go onto a freshly loaded base.
            self.model = self.base = self._adapter = None
            self.base = load_base(self.load_from, self.cfg, dtype=self.dtype).to(self.device).eval()
            self.model = self.base
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

    def prompts(self, items: list[dict]) -> list[str]:
        """The prompts of records (dicts with ``instruction`` and ``input``), laid out as training lays them out."""
        return self.format.render([i["instruction"] for i in items], [i["input"] for i in items])

    def generate(self, prompts: list[str], max_new_tokens: list[int], batch_size: int, num_beams: int = 1) -> list[str]:
        """Greedy (or beam) answers for rendered prompts, in the order given (see :meth:`answer_ids`)."""
        return [self.tokenizer.decode(ids, skip_special_tokens=True)
                for ids in self.answer_ids(prompts, max_new_tokens, batch_size, num_beams)]

    @torch.no_grad()
    def answer_ids(self, prompts: list[str], max_new_tokens: list[int], batch_size: int,
                   num_beams: int = 1) -> list[list[int]]:
        """The token ids generated after each rendered prompt, in the order given, up to the answer's end.

        Prompts are batched by length so little padding is generated over; each batch stops at
        the longest ``max_new_tokens`` of its members or when all have ended their answers (EOS, or a
        chat template's end of turn, which is kept as the last id).
        """
        ids = self.format.encode(self.tokenizer, prompts)
        order = sorted(range(len(prompts)), key=lambda k: len(ids[k]))
        out: list[list[int]] = [[] for _ in prompts]
        pad, stop = self.tokenizer.pad_token_id, self.format.stop_ids
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
                eos_token_id=stop, pad_token_id=pad,
            )
            for row, k in enumerate(chunk):
                new = gen[row, width:].tolist()
                # A finished row is padded to the batch's length: cut after its first stop token.
                ends = [j for j, t in enumerate(new) if t in stop]
                out[k] = new[:ends[0] + 1] if ends else new
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
        from bioray.evaluate.constrained import best_choice, decode_grammar, grammar_for

        out: list[str] = [""] * len(prompts)
        groups: dict[str, list[int]] = {}
        for k, spec in enumerate(specs):
            groups.setdefault("grammar" if spec.kind in ("tags", "list") else spec.kind, []).append(k)
        ids = self.format.encode(self.tokenizer, prompts)
        end = self.format.end  # answers end as training ends them
        if groups.get("grammar"):
            ks = groups["grammar"]
            walkers = decode_grammar(self.model, [ids[k] for k in ks],
                                     [grammar_for(self.tokenizer, specs[k], end) for k in ks], batch_size,
                                     self.tokenizer.pad_token_id, self.device)
            for k, w in zip(ks, walkers):
                out[k] = w.answer
            _check_canonical(self.tokenizer, walkers, end)
        if groups.get("choice"):
            ks = groups["choice"]
            best = best_choice(self.tokenizer, self.model, [ids[k] for k in ks], [specs[k].labels for k in ks],
                               batch_size, self.device, end)
            for k, answer in zip(ks, best):
                out[k] = answer
        if groups.get("free"):
            ks = groups["free"]
            free = self.generate([prompts[k] for k in ks], [max_new_tokens[k] for k in ks], batch_size, num_beams)
            for k, answer in zip(ks, free):
                out[k] = answer
        return out


def _check_canonical(tokenizer, walkers, end: int) -> None:
    """Warns where a constrained answer's tokens are not its text's own tokenisation.

    Only a tokenizer that merges across answer lines and changes earlier tokens when a line is
    added can cause that (see ``bioray.evaluate.constrained``); the answers still parse.
    """
    encoded = tokenizer([w.answer for w in walkers], add_special_tokens=False)["input_ids"]
    off = sum(ids + [end] != w.ids for ids, w in zip(encoded, walkers))
    if off:
        log.warning("%d of %d constrained answers are not tokenised as training tokenises their text; "
                    "this tokenizer merges across answer lines", off, len(walkers))
