"""Instructions bioray writes for each task, the per-record draw, and the prompt layout.

Every record gets one instruction drawn from its source's set. The draw hashes
(run.seed, source, split, index) with SHA-256, never Python's ``hash()`` (salted per
process), so two builds with the same seed write byte-identical records.

Placeholders filled per source: ``{entity}`` (iob: ``source.entity``), ``{labels}``
(re/cls with a ``labels`` map: its answer words; nli: the three gold labels).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

from bioray.config import CHAT_TEMPLATE, SourceConfig
from bioray.errors import ConfigError

NLI_LABELS = ("contradiction", "entailment", "neutral")

NER = (
    "Tag every token of the sentence as B (beginning of a {entity} mention), I (inside one) or O "
    "(outside). Answer with one `token : tag` line per token.",
    "Find the {entity} mentions in the sentence below. For each token, in order, write a line "
    "`token : tag` where tag is B for the first token of a {entity} mention, I for a following "
    "token of the same mention and O otherwise.",
    "Label each token with IOB2 tags for {entity} entities: B starts a mention, I continues it, "
    "O is any other token. Write one `token : tag` line per token, keeping the token order.",
    "You are annotating biomedical text for {entity} names. Go through the sentence token by token "
    "and answer with `token : B`, `token : I` or `token : O` on separate lines, one per token.",
    "Mark the {entity} entities in this sentence with the B/I/O scheme (B = first token of an "
    "entity, I = any later token of it, O = not part of one). Reply with one `token : tag` line "
    "for each token.",
)

# Typed NER: `{entity}` lists the types (e.g. "protein, DNA, RNA, cell_line or cell_type").
NER_TYPED = (
    "Tag every token of the sentence with its IOB2 tag for these entity types: {entity}. Use "
    "B-TYPE for the first token of a mention, I-TYPE for a following token and O otherwise. "
    "Answer with one `token : tag` line per token.",
    "Find the mentions of {entity} in the sentence. For each token, in order, write `token : tag` "
    "where tag is B-TYPE (mention start), I-TYPE (inside the mention) or O, TYPE being the "
    "mention's type.",
    "Annotate the sentence for the entity types {entity}. Write one line per token, `token : tag`, "
    "with tags B-TYPE, I-TYPE or O in IOB2 style.",
    "Label each token: B-TYPE begins an entity of type TYPE ({entity}), I-TYPE continues it, O is "
    "outside every entity. Answer with one `token : tag` line per token, in the original order.",
)

RE = (
    "The sentence mentions two entities, masked as @...$ tokens. Classify the relation between "
    "them. Answer with one of: {labels}.",
    "Read the sentence, in which the two entities of interest are replaced by placeholders such "
    "as @GENE$ and @DISEASE$. Which relation does the sentence state between them? Answer "
    "{labels}.",
    "Decide how the two masked entities in the sentence are related. Reply with exactly one "
    "label from this list: {labels}.",
    "Relation extraction: the entities are masked with @...$ markers. Give the relation type "
    "that holds between them, choosing from {labels}.",
)

# RE without a labels map: the answer words are whatever the file holds, unknown up front.
RE_OPEN = (
    "The sentence mentions two entities, masked as @...$ tokens. Classify the relation between "
    "them and answer with the relation label only.",
    "Read the sentence, in which the two entities of interest are replaced by placeholders such "
    "as @GENE$ and @DISEASE$. Which relation does it state between them? Answer with its label.",
    "Decide how the two masked entities in the sentence are related. Reply with the relation "
    "label and nothing else.",
    "Relation extraction: the entities are masked with @...$ markers. Give the label of the "
    "relation that holds between them.",
)

NLI = (
    "Given the premise and the hypothesis below, decide whether the premise entails the "
    "hypothesis, contradicts it, or neither. Answer with one word: {labels}.",
    "Read the clinical premise and the hypothesis. Is the hypothesis true (entailment), false "
    "(contradiction) or undetermined (neutral) given the premise? Answer {labels}.",
    "Natural language inference: label the relation between the premise and the hypothesis as "
    "one of {labels}.",
    "Does the hypothesis follow from the premise? Reply entailment if it must be true, "
    "contradiction if it must be false and neutral if it may or may not be true.",
)

CLS = (
    "Assign the text to every category that applies, chosen from: {labels}. Answer with the "
    "categories separated by commas.",
    "Which of these classes describe the text: {labels}? List each one that applies, separated by "
    "commas.",
    "Classify the passage into one or more of the following labels: {labels}. Reply with a "
    "comma-separated list of labels.",
    "Read the text and name all the categories it belongs to, from this set: {labels}. Separate "
    "several categories with commas.",
)

CLS_OPEN = (
    "Assign the text to every category that applies. Answer with the category labels separated "
    "by commas.",
    "Which classes describe the text? List each label that applies, separated by commas.",
    "Classify the passage into one or more categories. Reply with a comma-separated list of "
    "labels.",
    "Read the text and name all the categories it belongs to, separated by commas.",
)

QA = (
    "Answer the biomedical question using the information in the input.",
    "Read the input and give a short, accurate answer to the question it asks.",
    "Respond to the following biomedical question. Base the answer on the given context.",
    "Use the context to answer the question as precisely as possible.",
)

CHAT = CHAT_TEMPLATE
"""``corpus.template`` value that formats records with the tokenizer's own chat template."""

_PLACEHOLDER = re.compile(r"\{(instruction|input)\}")


def _join_choices(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _default_set(source: SourceConfig, index: int) -> tuple[str, ...]:
    if source.task == "ner":
        if source.entity is None:
            if source.format in ("instructions", "messages"):
                # Its records bring their own instructions; with no entity to name, bioray has
                # none to fill in empty ones (such records are rejected, see corpus.build).
                return ()
            raise ConfigError(
                f"config key 'corpus.sources[{index}].entity': expected what the instructions ask "
                f"to tag (e.g. disease) for the ner source {source.name!r}, or set its instructions"
            )
        return NER_TYPED if source.typed else NER
    if source.task == "re":
        return RE if source.labels else RE_OPEN
    if source.task == "cls":
        return CLS if source.labels else CLS_OPEN
    return {"nli": NLI, "qa": QA}[source.task]


def instruction_set(source: SourceConfig, index: int = 0) -> list[str]:
    """The instructions a source draws from, placeholders filled in.

    Args:
        source: the source's config; ``source.instructions`` overrides bioray's set.
        index: the source's position in ``corpus.sources`` (for error messages).

    Returns:
        The instructions, in a fixed order (the draw indexes into it). Empty for an
        ``instructions`` source whose own records must carry them (task ner, no entity).

    Raises:
        ConfigError: a built-in NER set is needed but ``source.entity`` is unset.
    """
    raw = source.instructions if source.instructions else _default_set(source, index)
    labels: list[str] = []
    if source.task == "nli":
        labels = list(NLI_LABELS)
    elif source.labels:
        labels = list(dict.fromkeys(source.labels.values()))
        if source.task == "cls" and source.none_label not in labels:
            labels.append(source.none_label)
    # str.replace, not str.format: user instructions may hold other braces.
    out = []
    for text in raw:
        if source.entity is not None:
            text = text.replace("{entity}", source.entity)
        if labels:
            text = text.replace("{labels}", _join_choices(labels))
        out.append(text)
    return out


def draw(instructions: list[str], seed: int, source: str, split: str, index: int) -> str:
    """Draws one instruction for a record, the same on every machine and run."""
    key = f"{seed}\x00{source}\x00{split}\x00{index}".encode()
    digest = hashlib.sha256(key).digest()
    return instructions[int.from_bytes(digest[:8], "big") % len(instructions)]


def render_prompt(template: str, instruction: str, input: str) -> str:
    """Lays out a prompt; the model's answer follows the returned text directly.

    Args:
        template: ``cfg.corpus.template``, holding ``{instruction}`` and ``{input}``.
        instruction: the record's instruction.
        input: the record's input.

    Returns:
        The template with both placeholders filled in one pass (so braces inside the
        instruction or input are never substituted again).
    """
    values = {"instruction": instruction, "input": input}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def chat_messages(instruction: str, input: str, system: Optional[str] = None) -> list[dict]:
    """A record as chat messages: an optional system turn, then one user turn (instruction and input).

    The user turn is the instruction, a blank line and the input; either alone where the other is empty.
    """
    user = f"{instruction}\n\n{input}" if instruction and input else instruction or input
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": user}]


def has_chat_template(folder: Path) -> bool:
    """Whether a tokenizer folder ships a chat template (read from its files; nothing imported)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


class PromptFormat:
    """How a prompt is laid out and encoded, and which token ends an answer: the one place for both.

    Training (:class:`bioray.data.Tokenise`) and scoring (:mod:`bioray.evaluate.generate`) both build
    prompts here, so an example is tokenised the same way in both: ``head + encode(prompt)`` where the
    model answers, then ``encode(answer) + [end]``, the part the loss counts.

    - ``corpus.template`` a layout (the paper's ``### Instruction`` one by default): the layout filled
      in, after BOS where the tokenizer has one; the answer ends with EOS.
    - ``corpus.template: chat``: the tokenizer's own chat template with its generation prompt
      (``add_generation_prompt=True``); no BOS added (a template writes its own). The answer ends with
      the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ...), learned so that
      generation stops there.

    Picklable: a chat format keeps the tokenizer, whose template renders the prompts in the Ray Data
    tasks that tokenise.

    Raises:
        ConfigError: chat, and the tokenizer has no chat template.
    """

    def __init__(self, template: str, tokenizer, system_prompt: Optional[str] = None):
        self.template, self.system_prompt = template, system_prompt
        self.chat = template == CHAT
        self.tokenizer = tokenizer if self.chat else None
        if self.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError(f"config key 'corpus.template': chat needs a tokenizer with a chat template; "
                                  f"{tokenizer.name_or_path or 'this tokenizer'} has none (use a chat/instruct "
                                  f"model, or a layout with {{instruction}} and {{input}})")
            self.head: list[int] = []
            self.end = _chat_end(tokenizer, system_prompt)
        else:
            self.head = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
            self.end = tokenizer.eos_token_id

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end generation: the answer's end, and EOS where that differs."""
        eos = [] if self.tokenizer is None else [self.tokenizer.eos_token_id]
        return list(dict.fromkeys(i for i in [self.end, *eos] if i is not None))

    def render(self, instructions: list[str], inputs: list[str]) -> list[str]:
        """The prompts of records as text; the answer follows each directly."""
        if not self.chat:
            return [render_prompt(self.template, i, x) for i, x in zip(instructions, inputs)]
        if not instructions:
            return []
        chats = [chat_messages(i, x, self.system_prompt) for i, x in zip(instructions, inputs)]
        return self.tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)

    def encode(self, tokenizer, prompts: list[str]) -> list[list[int]]:
        """Token ids of rendered prompts: the head (BOS, or nothing for chat), then the text's own tokens."""
        ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return [self.head + x for x in ids] if self.head else ids


# Stands for an answer while the chat template is probed for what follows one.
_ANSWER_PROBE = "bioray answer probe"


def _chat_end(tokenizer, system_prompt: Optional[str]) -> int:
    """The token a chat template puts right after an assistant turn's content (its end of turn).

    The first special token after the answer in a rendered conversation; EOS where the template puts
    none there (it then ends answers as the paper's layout does).
    """
    chat = chat_messages("instruction", "input", system_prompt) + [{"role": "assistant", "content": _ANSWER_PROBE}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    at = text.rfind(_ANSWER_PROBE)
    if at < 0:
        raise ConfigError("config key 'corpus.template': the tokenizer's chat template does not write the assistant "
                          "turn's content, so answers cannot be trained on; use a layout with {instruction} and "
                          "{input}")
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tail = tokenizer(text[at + len(_ANSWER_PROBE):], add_special_tokens=False)["input_ids"]
    end = next((i for i in tail if i in special), tokenizer.eos_token_id)
    if end is None:
        raise ConfigError("config key 'corpus.template': the chat template ends an assistant turn with no special "
                          "token and the tokenizer has no EOS: nothing would stop generation")
    return end
