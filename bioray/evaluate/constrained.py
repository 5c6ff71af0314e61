"""Constrained decoding: answers that always parse, scored at a fraction of free generation's cost.

Two methods, picked per task by :func:`answer_spec`:

- **Grammar decoding** (NER, multi-label classification). Greedy generation where each step may
  only pick tokens that keep the answer a prefix of the tokenisation of *some* valid answer
  (exactly what ``model.generate(prefix_allowed_tokens_fn=...)`` would give). A valid answer is
  a sequence of *pieces*: one ``token : TAG`` line per input token for NER, one label (or the
  none word) per list item for HoC. Where only one token is allowed it is forced, and every run
  of forced tokens is fed in one forward step with the KV cache, so an NER answer costs about one
  step per tag instead of one per token.
- **Choice scoring** (RE, NLI). Every answer word of the label space is scored by its
  log-likelihood (answer tokens + EOS) after the prompt, all in one batched pass over a copy of
  the prompt's KV cache per choice; the best one is the answer.

Tokenisation. Training tokenises the answer on its own (``tokenizer(output) + EOS``), so a
valid answer's token ids are ``encode(answer_text) + [EOS]`` (with ``corpus.template: chat``, the chat
template's end-of-turn token in place of EOS: every function here takes it as ``end``). Pieces are tokenised one at a
time, which equals the whole answer's tokenisation when the tokenizer never merges across a
piece boundary. That holds for byte-level BPE (GPT-2's pre-tokenizer splits off ``"\\n"`` and the
``", "`` before a label), and :func:`lines_separable` checks it per answer; where it does not hold
(e.g. SentencePiece's leading ``▁``) each piece is tokenised in the context of the answer so far.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Protocol

import torch

from bioray.evaluate.parse import NER_SEPARATOR

LIST_SEPARATOR = ", "
"""Between labels of a multi-label answer (as the corpus writes them)."""

CHOICE_TASKS = ("re", "nli")
"""Single-label tasks: answered by scoring each label word."""


@dataclasses.dataclass(frozen=True)
class AnswerSpec:
    """What a valid answer looks like for one record."""

    kind: str
    """tags (one `token : TAG` line per input token), choice (one label), list (labels or the none
    word) or free (no answer space known: generated freely)."""
    labels: tuple[str, ...] = ()
    """The allowed tags (tags) or answer words (choice, list; the none word left out)."""
    tokens: tuple[str, ...] = ()
    """tags only: the input tokens, one answer line each."""
    none_label: str = "none"
    """list only: the answer that means "no label"."""


def answer_spec(task: str, input_text: str, labels: Sequence[str] | None, none_label: str = "none") -> AnswerSpec:
    """The answer space of one record, from its source's task and label space (the manifest's ``labels``).

    Args:
        task: ner, re, nli, cls or qa.
        input_text: The record's input (NER tokens are ``input.split(" ")``).
        labels: Tags (ner) or answer words (re, nli, cls); None or empty means unknown.
        none_label: cls only: the answer that means "no label".

    Returns:
        The spec; ``kind == "free"`` where the answer cannot be constrained (qa, no labels).
    """
    words = tuple(dict.fromkeys(label for label in (labels or ()) if label.strip()))
    if not words:
        return AnswerSpec("free")
    if task == "ner":
        return AnswerSpec("tags", labels=words, tokens=tuple(input_text.split(" ")))
    if task in CHOICE_TASKS:
        return AnswerSpec("choice", labels=words)
    if task == "cls":
        items = tuple(w for w in words if w.strip().casefold() != none_label.strip().casefold())
        return AnswerSpec("list", labels=items, none_label=none_label)
    return AnswerSpec("free")


# ----------------------------------------------------------------------------- grammars


@dataclasses.dataclass(frozen=True)
class Piece:
    """One step of an answer's grammar: a tag, a list item or the end."""

    name: str
    """What was chosen (the tag or label); the answer text is rebuilt from these."""
    ids: tuple[int, ...]
    """Its token ids; a final piece ends with EOS."""
    final: bool
    """The answer ends with this piece."""


class Grammar(Protocol):
    def pieces(self, history: tuple[str, ...]) -> list[Piece]:
        """The pieces that may follow the pieces named in ``history``."""

    def text(self, history: tuple[str, ...]) -> str:
        """The answer text of a complete answer."""


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _in_context(tokenizer, before: str, texts: list[str]) -> list[tuple[int, ...]]:
    """Token ids of each text as it continues ``before`` (the answer so far).

    Used where the tokenizer merges across piece boundaries: the tokens of ``before + text`` after
    those of ``before``. Where ``before``'s tokens are not a prefix of that (a merge reaches back
    into the answer so far), the text's own tokens are used and the answer may deviate from the
    canonical tokenisation; it still decodes to a valid answer.
    """
    if not texts:
        return []
    head = _encode(tokenizer, [before])[0] if before else []
    out = []
    for text, full in zip(texts, _encode(tokenizer, [before + t for t in texts])):
        out.append(tuple(full[len(head):]) if full[:len(head)] == head else tuple(_encode(tokenizer, [text])[0]))
    return out


class TagGrammar:
    """NER: ``token : TAG`` per input token, joined by newlines, then EOS; only the tags are free."""

    def __init__(self, tokenizer, tokens: Sequence[str], tags: Sequence[str], separable: bool | None = None,
                 end: int | None = None):
        self.tok, self.tokens, self.tags = tokenizer, list(tokens), list(tags)
        self.eos = tokenizer.eos_token_id if end is None else end
        table = self._line_table()
        self.separable = lines_separable(tokenizer, self.tokens, self.tags, table, self.eos) if separable is None \
            else separable
        self._table = table if self.separable else None

    def _line(self, k: int, tag: str) -> str:
        end = "" if k == len(self.tokens) - 1 else "\n"
        return f"{self.tokens[k]}{NER_SEPARATOR}{tag}{end}"

    def _line_table(self) -> list[list[Piece]]:
        n = len(self.tokens)
        texts = [self._line(k, tag) for k in range(n) for tag in self.tags]
        ids = iter(_encode(self.tok, texts))
        return [[self._piece(k, tag, next(ids)) for tag in self.tags] for k in range(n)]

    def _piece(self, k: int, tag: str, ids) -> Piece:
        last = k == len(self.tokens) - 1
        return Piece(tag, tuple(ids) + ((self.eos,) if last else ()), last)

    def pieces(self, history: tuple[str, ...]) -> list[Piece]:
        k = len(history)
        if k >= len(self.tokens):
            return []
        if self._table is not None:
            return self._table[k]
        before = self.text(history) + ("\n" if history else "")
        texts = [self._line(k, tag) for tag in self.tags]
        return [self._piece(k, tag, ids) for tag, ids in zip(self.tags, _in_context(self.tok, before, texts))]

    def text(self, history: tuple[str, ...]) -> str:
        return "\n".join(f"{t}{NER_SEPARATOR}{g}" for t, g in zip(self.tokens, history))


def lines_separable(tokenizer, tokens: Sequence[str], tags: Sequence[str], table: list[list[Piece]],
                    end: int | None = None) -> bool:
    """Whether this NER answer's tokenisation is the concatenation of its lines' tokenisations.

    Merges across a newline could only join the end of one line (its tag) with the start of the
    next (its token), so answers that use one tag throughout cover every pair that can occur.
    Byte-level BPE passes (its pre-tokenizer always splits ``"\\n"`` off), SentencePiece-style
    tokenizers that prefix the first word do not.
    """
    end = tokenizer.eos_token_id if end is None else end
    answers = ["\n".join(f"{t}{NER_SEPARATOR}{tag}" for t in tokens) for tag in tags]
    for j, ids in enumerate(_encode(tokenizer, answers)):
        pieces = [ids_ for line in table for ids_ in line[j].ids]
        if ids + [end] != pieces:
            return False
    return True


class ListGrammar:
    """Multi-label: ``label (", " label)*`` without repeats, or the none word; then EOS."""

    def __init__(self, tokenizer, labels: Sequence[str], none_label: str, separable: bool | None = None,
                 end: int | None = None):
        self.tok, self.labels, self.none = tokenizer, list(labels), none_label
        self.eos = tokenizer.eos_token_id if end is None else end
        first = _encode(tokenizer, self.labels + [none_label])
        more = _encode(tokenizer, [LIST_SEPARATOR + label for label in self.labels])
        self._first = [Piece(label, tuple(ids), False) for label, ids in zip(self.labels, first)]
        self._first.append(Piece(none_label, (*first[-1], self.eos), True))
        self._more = {label: Piece(label, tuple(ids), False) for label, ids in zip(self.labels, more)}
        self.separable = _list_separable(tokenizer, tuple(self.labels)) if separable is None else separable

    def pieces(self, history: tuple[str, ...]) -> list[Piece]:
        if not history:
            return self._first
        left = [label for label in self.labels if label not in history]
        end = Piece("", (self.eos,), True)
        if self.separable:
            return [self._more[label] for label in left] + [end]
        ids = _in_context(self.tok, self.text(history), [LIST_SEPARATOR + label for label in left])
        return [Piece(label, i, False) for label, i in zip(left, ids)] + [end]

    def text(self, history: tuple[str, ...]) -> str:
        return LIST_SEPARATOR.join(name for name in history if name)


def _list_separable(tokenizer, labels: tuple[str, ...]) -> bool:
    """Whether ``a, b`` tokenises as ``a`` then ``, b`` for every ordered pair of labels."""
    pairs = [(a, b) for a in labels for b in labels if a != b]
    if not pairs:
        return True
    own = dict(zip(labels, _encode(tokenizer, list(labels))))
    more = dict(zip(labels, _encode(tokenizer, [LIST_SEPARATOR + b for b in labels])))
    joined = _encode(tokenizer, [a + LIST_SEPARATOR + b for a, b in pairs])
    return all(ids == own[a] + more[b] for (a, b), ids in zip(pairs, joined))


def grammar_for(tokenizer, spec: AnswerSpec, end: int | None = None) -> Grammar:
    """The grammar of a tags or list spec; answers end with ``end`` (None: EOS)."""
    if spec.kind == "tags":
        return TagGrammar(tokenizer, spec.tokens, spec.labels, end=end)
    if spec.kind == "list":
        return _list_grammar(tokenizer, spec.labels, spec.none_label, end)
    raise ValueError(f"no grammar for answers of kind {spec.kind!r}")


@functools.lru_cache(maxsize=16)
def _list_grammar(tokenizer, labels: tuple[str, ...], none_label: str, end: int | None) -> ListGrammar:
    # One per label space: its pieces depend on the history only, and the pair check is |labels|².
    return ListGrammar(tokenizer, labels, none_label, end=end)


class Walker:
    """Where one answer stands in its grammar: the pieces it may be inside and how far in.

    Several pieces can share a prefix (``B`` and ``B-protein``; ``invasion`` and ``invasion and
    metastasis``), so the walker tracks every piece consistent with the tokens so far and allows
    the union of their next tokens; a finished non-final piece opens the pieces that follow it.
    """

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self.ids: list[int] = []
        self.answer: str | None = None
        self._hyps = self._open([((), p, 0) for p in grammar.pieces(())])

    @property
    def done(self) -> bool:
        return self.answer is not None

    def allowed(self) -> list[int]:
        """The tokens that keep the answer valid, ascending (ties go to the lowest id, as in argmax)."""
        return sorted({piece.ids[at] for _, piece, at in self._hyps})

    def advance(self, token: int) -> None:
        """Appends ``token`` (one of :meth:`allowed`)."""
        hyps = [(h, p, at + 1) for h, p, at in self._hyps if p.ids[at] == token]
        if not hyps:
            raise ValueError(f"token {token} is not allowed here; allowed: {self.allowed()}")
        self.ids.append(token)
        for h, p, at in hyps:
            if p.final and at == len(p.ids):
                self.answer = self.grammar.text((*h, p.name))
                self._hyps = []
                return
        self._hyps = self._open(hyps)

    def _open(self, hyps: list) -> list:
        out = []
        for h, p, at in hyps:
            if at < len(p.ids):
                out.append((h, p, at))
            elif not p.final:
                nxt = (*h, p.name)
                out.extend(self._open([(nxt, q, 0) for q in self.grammar.pieces(nxt)]))
        return out


# ----------------------------------------------------------------------------- the model side


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids (0 at each row's first real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.tensor(s)
        mask[row, width - len(s):] = 1
    # As generate() does: positions count real tokens, pads get 0 (they are masked anyway).
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _right_pad(runs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask and lengths of the token runs fed in one step."""
    width = max(len(r) for r in runs)
    ids = torch.full((len(runs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(runs), width), dtype=torch.long)
    for row, r in enumerate(runs):
        ids[row, :len(r)] = torch.tensor(r)
        mask[row, :len(r)] = 1
    return ids.to(device), mask.to(device), torch.tensor([len(r) for r in runs], device=device)


def _prefill(model, prompts: list[list[int]], pad_id: int, device):
    """Runs the prompts; returns the next-token logits, the cache, the mask and each row's next position."""
    ids, mask, pos = _left_pad(prompts, pad_id, device)
    # Only the last position's logits are used: skip the LM head everywhere else (as generate() does).
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), out.cache, mask, mask.sum(-1)


def _step(model, runs: list[list[int]], cache, mask, next_pos, pad_id: int, device):
    """Feeds one run of tokens per row (ragged: right-padded, masked) on top of the cache.

    Returns:
        The logits after each row's last real token, the grown mask and the next positions.
    """
    ids, step_mask, lengths = _right_pad(runs, pad_id, device)
    # Every row's cache grows by the same width; the pads stay masked for every later step.
    mask = torch.cat([mask, step_mask], dim=1)
    pos = next_pos[:, None] + torch.arange(ids.shape[1], device=device)[None, :]
    # The LM head runs only at the positions where some row's run ends.
    ends, where = torch.unique(lengths - 1, return_inverse=True)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                logits_to_keep=ends)
    last = out.logits[torch.arange(len(runs), device=device), where].float()
    return last, mask, next_pos + lengths


def _extend(walker: Walker, logits: torch.Tensor | None) -> list[int]:
    """Advances a walker as far as one forward step allows: at most one choice, then forced tokens.

    The choice is the argmax of ``logits`` over the allowed tokens (None: no choice, forced tokens
    only); those logits are stale once any token is appended, so the run stops at the next choice
    (or at the end).
    """
    run: list[int] = []
    while not walker.done:
        allowed = walker.allowed()
        if len(allowed) == 1:
            token = allowed[0]
        elif not run and logits is not None:
            token = allowed[int(torch.argmax(logits[allowed]))]
        else:
            break
        walker.advance(token)
        run.append(token)
    return run


def _by_length(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def decode_grammar(model, prompts: list[list[int]], grammars: list[Grammar], batch_size: int, pad_id: int,
                   device: str | torch.device = "cpu") -> list[Walker]:
    """Greedy grammar-constrained answers for tokenised prompts, in the order given.

    Args:
        model: A causal LM (or peft model) that takes ``cache=`` and returns ``.logits``, ``.cache``.
        prompts: Prompt token ids (BOS included where the model uses one).
        grammars: One grammar per prompt.
        batch_size: Prompts per batch (length-sorted, like free generation).
        pad_id: The padding token.
        device: Where the model is.

    Returns:
        One finished :class:`Walker` per prompt: ``.ids`` the answer's token ids (EOS last),
        ``.answer`` its text.
    """
    walkers = [Walker(g) for g in grammars]
    for chunk in _by_length(prompts, batch_size):
        _decode_chunk(model, [prompts[k] for k in chunk], [walkers[k] for k in chunk], pad_id, device)
    return walkers


def _decode_chunk(model, prompts: list[list[int]], walkers: list[Walker], pad_id: int, device) -> None:
    # The answer's opening forced run (the first NER token and " :") joins the prompt's prefill.
    logits, cache, mask, next_pos = _prefill(model, [p + _extend(w, None) for p, w in zip(prompts, walkers)],
                                             pad_id, device)
    rows = list(range(len(walkers)))
    while True:
        runs = [_extend(walkers[k], logits[r]) for r, k in enumerate(rows)]
        keep = [r for r, k in enumerate(rows) if not walkers[k].done]
        if not keep:
            return
        if len(keep) < len(rows):
            # A finished answer needs no more forward steps: drop its row from the cache.
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, next_pos = mask[index], next_pos[index]
            rows, runs = [rows[r] for r in keep], [runs[r] for r in keep]
        logits, mask, next_pos = _step(model, runs, cache, mask, next_pos, pad_id, device)


@torch.no_grad()
def score_choices(model, prompts: list[list[int]], choices: list[list[list[int]]], batch_size: int, pad_id: int,
                  device: str | torch.device = "cpu") -> list[list[float]]:
    """Log-likelihood of every choice after its prompt, in one batched pass per batch of prompts.

    Args:
        model: A causal LM (or peft model).
        prompts: Prompt token ids.
        choices: Per prompt, the token ids of each allowed answer, EOS included.
        batch_size: Prompts per batch; each batch runs ``sum(len(choices))`` rows in its second pass.
        pad_id: The padding token.
        device: Where the model is.

    Returns:
        Per prompt, the summed log-probability of each choice's tokens.
    """
    scores: list[list[float]] = [[] for _ in prompts]
    for chunk in _by_length(prompts, batch_size):
        part = _score_chunk(model, [prompts[k] for k in chunk], [choices[k] for k in chunk], pad_id, device)
        for k, s in zip(chunk, part):
            scores[k] = s
    return scores


def _score_chunk(model, prompts, choices, pad_id: int, device) -> list[list[float]]:
    logits, cache, mask, next_pos = _prefill(model, prompts, pad_id, device)
    first = torch.log_softmax(logits, dim=-1)
    owner = [k for k, cs in enumerate(choices) for _ in cs]
    flat = [c for cs in choices for c in cs]
    # One copy of each prompt's cache per choice (indices may repeat).
    index = torch.tensor(owner, device=device)
    cache.batch_select_indices(index)
    fed = [c[:-1] or [pad_id] for c in flat]  # a one-token choice feeds nothing; its pad is ignored below
    ids, step_mask, lengths = _right_pad(fed, pad_id, device)
    pos = next_pos[index][:, None] + torch.arange(ids.shape[1], device=device)[None, :]
    out = model(input_ids=ids, attention_mask=torch.cat([mask[index], step_mask], 1), position_ids=pos,
                cache=cache, use_cache=True)
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    totals = []
    for row, c in enumerate(flat):
        total = first[owner[row], c[0]]
        if len(c) > 1:
            total = total + logp[row, torch.arange(len(c) - 1), torch.tensor(c[1:])].sum()
        totals.append(float(total))
    out_scores: list[list[float]] = [[] for _ in prompts]
    for row, k in enumerate(owner):
        out_scores[k].append(totals[row])
    return out_scores


def best_choice(tokenizer, model, prompts: list[list[int]], label_sets: list[Sequence[str]], batch_size: int,
                device: str | torch.device = "cpu", end: int | None = None) -> list[str]:
    """The most likely answer word per prompt (ties go to the first in its label set); answers end with
    ``end`` (None: EOS)."""
    eos = tokenizer.eos_token_id if end is None else end
    encoded = {}
    for labels in label_sets:
        for label in labels:
            encoded.setdefault(label, None)
    words = list(encoded)
    for word, ids in zip(words, _encode(tokenizer, words)):
        encoded[word] = [*ids, eos]
    choices = [[encoded[label] for label in labels] for labels in label_sets]
    scores = score_choices(model, prompts, choices, batch_size, tokenizer.pad_token_id, device)
    return [labels[max(range(len(s)), key=lambda i: (s[i], -i))] for labels, s in zip(label_sets, scores)]


__all__ = ["AnswerSpec", "Grammar", "ListGrammar", "Piece", "TagGrammar", "Walker", "answer_spec", "best_choice",
           "decode_grammar", "grammar_for", "lines_separable", "score_choices"]
