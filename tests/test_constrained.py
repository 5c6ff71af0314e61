"""Constrained decoding: exactly greedy-under-constraints, batched = unbatched, answers always parse.

A BPE tokenizer and a 2-layer Llama are trained for a few seconds on real NCBI-disease
sentences; since that model answers O almost everywhere, the equality checks also run a
random Llama with large weights, whose choices cover every tag and label. CPU only, ~15 s.
"""

import itertools
import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from bioray.evaluate.constrained import (
    ListGrammar,
    TagGrammar,
    Walker,
    answer_spec,
    best_choice,
    decode_grammar,
    score_choices,
)
from bioray.evaluate.parse import parse_multilabel, parse_ner
from bioray.model import _train_tokenizer

NER_DATA = Path(__file__).resolve().parents[2] / "shared/data/ner"
TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Output:\n"
UNTYPED = ("B", "I", "O")
HOC = ("invasion", "invasion and metastasis", "genomic instability", "evading growth suppressors")


def _sentences(path: Path, limit: int, max_tokens: int) -> list[tuple[list[str], list[str]]]:
    out, tokens, tags = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if line.strip():
            token, tag = line.split("\t")
            tokens.append(token)
            tags.append(tag)
            continue
        if tokens and len(tokens) <= max_tokens:
            out.append((tokens, tags))
        tokens, tags = [], []
        if len(out) == limit:
            break
    return out


def _untyped(tags: list[str]) -> list[str]:
    return [t[0] for t in tags]


def _answer(tokens: list[str], tags: list[str]) -> str:
    return "\n".join(f"{t} : {g}" for t, g in zip(tokens, tags))


def _prompt(tokens: list[str]) -> str:
    return TEMPLATE.format(instruction="Tag every disease mention (B, I, O).", input=" ".join(tokens))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: threads only add contention (10x slower on a busy 2-core machine, measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def records():
    if not (NER_DATA / "NCBI-disease" / "devel.tsv").is_file():
        pytest.skip(f"real NER data not found at {NER_DATA} (../shared/data/ner beside the project)")
    train = _sentences(NER_DATA / "NCBI-disease" / "train.tsv", 300, 40)
    test = _sentences(NER_DATA / "NCBI-disease" / "devel.tsv", 24, 18)
    return train, test


def _llama(tok, seed: int, init_std: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
        initializer_range=init_std))


@pytest.fixture(scope="module")
def tiny(records):
    """A BPE tokenizer and a 2-layer Llama briefly trained on NER prompts and answers."""
    train, _ = records
    texts = [_prompt(t) + _answer(t, _untyped(g)) for t, g in train]
    tok = _train_tokenizer(texts, 600)
    model = _llama(tok, 0)
    ids = [[tok.bos_token_id, *x, tok.eos_token_id] for x in tok(texts, add_special_tokens=False)["input_ids"]]
    flat = torch.tensor([i for x in ids for i in x])
    rows = flat[: len(flat) // 128 * 128].view(-1, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = rows[torch.randint(len(rows), (8,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return tok, model.eval()


def _prompt_ids(tok, prompts: list[str]) -> list[list[int]]:
    return [[tok.bos_token_id, *x] for x in tok(prompts, add_special_tokens=False)["input_ids"]]


def _generate(tok, model, prompts: list[list[int]], allowed_fn, batch_size: int = 8) -> list[list[int]]:
    """transformers' own greedy generation under ``prefix_allowed_tokens_fn``; answer ids up to EOS."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in chunk])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in chunk])[:, None]).long()
        gen = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=400,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            prefix_allowed_tokens_fn=lambda b, x: allowed_fn(start + b, x[width:].tolist()),
        )
        for row in gen[:, width:].tolist():
            out.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return out


def _reference_tags_fn(tok, sentences: list[list[str]], tags: tuple[str, ...]):
    """Allowed next tokens by brute force over whole-answer tokenisations (independent of the grammar).

    A token is allowed when the answer so far plus it is a prefix of ``encode(answer) + EOS`` for
    some valid answer. Lines already complete fix their tags; the rest is enumerated as the
    current line's tag times one tag for every later line (which covers every boundary merge).
    """
    eos = tok.eos_token_id

    @lru_cache(maxsize=None)
    def enc(text: str) -> tuple[int, ...]:
        return tuple(tok(text, add_special_tokens=False)["input_ids"])

    def allowed(b: int, h: list[int]) -> list[int]:
        tokens, h = sentences[b], tuple(h)
        fixed: list[str] = []
        while len(fixed) + 1 < len(tokens):
            done = [g for g in tags if _is_prefix(enc(_answer(tokens, [*fixed, g]) + "\n"), h)]
            if len(done) != 1:
                break
            fixed.append(done[0])
        rest = len(tokens) - len(fixed) - 1
        out = set()
        for g, f in itertools.product(tags, tags):
            full = enc(_answer(tokens, [*fixed, g, *[f] * rest])) + (eos,)
            if len(full) > len(h) and full[: len(h)] == h:
                out.add(full[len(h)])
        return sorted(out) or [eos]

    return allowed


def _is_prefix(p: tuple[int, ...], h: tuple[int, ...]) -> bool:
    return len(p) <= len(h) and h[: len(p)] == p


# ------------------------------------------------------------------------------ tokenisation


def test_per_line_tokenisation_equals_the_whole_answer_on_real_records(records, tiny):
    tok, _ = tiny
    train, test = records
    for tokens, tags in train[:100] + test:
        gold = _untyped(tags)
        grammar = TagGrammar(tok, tokens, UNTYPED)
        assert grammar.separable, "byte-level BPE never merges across the newline between answer lines"
        pieces = [grammar.pieces(tuple(gold[:k]))[UNTYPED.index(g)].ids for k, g in enumerate(gold)]
        whole = tok(_answer(tokens, gold), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert [i for p in pieces for i in p] == whole


def test_in_context_fallback_is_exact_for_a_llama_style_tokenizer(records):
    """Llama-style: ``▁`` before the text's first word, newline a token of its own; not line-separable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    train, test = records
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(prepend_scheme="first")])
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    texts = [_answer(t, _untyped(g)) for t, g in train]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"],
                                                            show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    separable = []
    for tokens, tags in test:
        gold = _untyped(tags)
        grammar = TagGrammar(tok, tokens, UNTYPED)
        separable.append(grammar.separable)
        pieces = [grammar.pieces(tuple(gold[:k]))[UNTYPED.index(g)].ids for k, g in enumerate(gold)]
        assert [i for p in pieces for i in p] == tok(_answer(tokens, gold))["input_ids"] + [tok.eos_token_id]
    assert not all(separable)


# ------------------------------------------------------------------------------ NER


@pytest.mark.parametrize("weights, tags", [
    ("trained", UNTYPED), ("random", UNTYPED), ("random", ("B", "B-Disease", "I", "I-Disease", "O"))],
    ids=["trained-BIO", "random-BIO", "random-prefix-tags"])
def test_ner_equals_transformers_generate_with_prefix_allowed_tokens(records, tiny, weights, tags):
    # The briefly trained model answers O throughout (as most gold tags are); large random
    # weights make every kind of choice, including a tag that prefixes another (B, B-Disease).
    tok, model = tiny
    model = model if weights == "trained" else _llama(tok, 1, init_std=0.2).eval()
    _, test = records
    sentences = [t for t, _ in test]
    prompts = _prompt_ids(tok, [_prompt(t) for t in sentences])
    walkers = decode_grammar(model, prompts, [TagGrammar(tok, t, tags) for t in sentences], 8, tok.pad_token_id)
    expected = _generate(tok, model, prompts, _reference_tags_fn(tok, sentences, tags))
    assert [w.ids for w in walkers] == expected
    for w, tokens in zip(walkers, sentences):
        parsed = parse_ner(w.answer, tokens, tags)
        assert parsed.well_formed and tok.decode(w.ids, skip_special_tokens=True) == w.answer
    if weights == "random":
        assert {g for w, t in zip(walkers, sentences) for g in parse_ner(w.answer, t, tags).tags} == set(tags)


def test_ner_batched_equals_unbatched_and_fallback_equals_fast_path(records, tiny):
    tok, model = tiny
    _, test = records
    sentences = [t for t, _ in test[:12]]
    prompts = _prompt_ids(tok, [_prompt(t) for t in sentences])
    one = decode_grammar(model, prompts, [TagGrammar(tok, t, UNTYPED) for t in sentences], 1, tok.pad_token_id)
    many = decode_grammar(model, prompts, [TagGrammar(tok, t, UNTYPED) for t in sentences], 5, tok.pad_token_id)
    slow = decode_grammar(model, prompts, [TagGrammar(tok, t, UNTYPED, separable=False) for t in sentences], 5,
                          tok.pad_token_id)
    assert [w.ids for w in many] == [w.ids for w in one] == [w.ids for w in slow]


# ------------------------------------------------------------------------------ lists (HoC)


def _reference_list_fn(tok, labels: tuple[str, ...], none_label: str):
    """Allowed next tokens by enumerating every valid answer: each ordered subset, or the none word."""
    answers = [none_label] + [", ".join(p) for k in range(1, len(labels) + 1)
                              for p in itertools.permutations(labels, k)]
    encoded = [(*ids, tok.eos_token_id) for ids in tok(answers, add_special_tokens=False)["input_ids"]]

    def allowed(b: int, h: list[int]) -> list[int]:
        h = tuple(h)
        return sorted({a[len(h)] for a in encoded if len(a) > len(h) and a[: len(h)] == h}) or [tok.eos_token_id]

    return allowed


def test_multilabel_equals_generate_and_always_parses(records, tiny):
    tok, _ = tiny
    model = _llama(tok, 1, init_std=0.2).eval()  # answers vary: single labels, lists, none, prefix labels
    _, test = records
    texts = [" ".join(t) for t, _ in test[:16]]
    prompts = _prompt_ids(tok, [TEMPLATE.format(instruction="Which hallmarks? " + ", ".join(HOC), input=x)
                                for x in texts])
    grammar = ListGrammar(tok, HOC, "none")
    walkers = decode_grammar(model, prompts, [grammar] * len(prompts), 8, tok.pad_token_id)
    assert [w.ids for w in walkers] == _generate(tok, model, prompts, _reference_list_fn(tok, HOC, "none"))
    one = decode_grammar(model, prompts, [grammar] * len(prompts), 1, tok.pad_token_id)
    slow = decode_grammar(model, prompts, [ListGrammar(tok, HOC, "none", separable=False)] * len(prompts), 8,
                          tok.pad_token_id)
    assert [w.ids for w in one] == [w.ids for w in walkers] == [w.ids for w in slow]
    for w in walkers:
        assert parse_multilabel(w.answer, HOC, "none").well_formed
    answers = {w.answer for w in walkers}
    assert "none" in answers and any(", " in a for a in answers) and len(answers) > 4


def test_walker_follows_labels_that_prefix_other_labels(tiny):
    tok, _ = tiny
    walker = Walker(ListGrammar(tok, HOC, "none"))
    target = tok("invasion, invasion and metastasis", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for token in target:
        assert token in walker.allowed()
        walker.advance(token)
    assert walker.done and walker.answer == "invasion, invasion and metastasis"


# ------------------------------------------------------------------------------ choices (RE, NLI)


def test_choice_scores_equal_full_sequence_log_likelihood_batched_or_not(records, tiny):
    tok, model = tiny
    _, test = records
    prompts = _prompt_ids(tok, [TEMPLATE.format(instruction="Entailment?", input=" ".join(t)) for t, _ in test[:10]])
    labels = ["contradiction", "entailment", "neutral", "no"]
    choices = [[*x, tok.eos_token_id] for x in tok(labels, add_special_tokens=False)["input_ids"]]
    got = score_choices(model, prompts, [choices] * len(prompts), 4, tok.pad_token_id)
    one = score_choices(model, prompts, [choices] * len(prompts), 1, tok.pad_token_id)
    for p, scores, scores_one in zip(prompts, got, one):
        for c, s, s1 in zip(choices, scores, scores_one):
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0], -1)
            ref = float(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(c)))
            assert s == pytest.approx(ref, abs=1e-3) and s1 == pytest.approx(ref, abs=1e-3)
    best = best_choice(tok, model, prompts, [labels] * len(prompts), 4)
    assert best == [labels[max(range(4), key=lambda i: (s[i], -i))] for s in got]


def test_answer_spec_picks_the_method_per_task():
    assert answer_spec("ner", "a b", ["B", "I", "O"]).tokens == ("a", "b")
    assert answer_spec("re", "x", ["false", "true"]).kind == "choice"
    assert answer_spec("nli", "x", ["contradiction", "entailment", "neutral"]).kind == "choice"
    spec = answer_spec("cls", "x", ["a", "b", "none"], "none")
    assert spec.kind == "list" and spec.labels == ("a", "b")
    assert answer_spec("qa", "x", []).kind == "free"
    assert answer_spec("re", "x", None).kind == "free"


# ------------------------------------------------------------------------------ the scorer actor


def test_scorer_predicts_constrained_answers_that_all_parse(records, tiny, tmp_path):
    """``Scorer`` (the pool's actor class, used here without Ray) dispatches on ``eval.decoding``."""
    from bioray.config import from_dict, to_dict
    from bioray.evaluate.pool import Scorer, source_decoding

    tok, model = tiny
    _, test = records
    base = tmp_path / "base"
    model.save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    sources = [
        {"name": "ner", "format": "iob", "task": "ner", "entity": "disease"},
        {"name": "nli", "format": "nli", "task": "nli"},
        {"name": "hoc", "format": "multilabel", "task": "cls", "labels": {str(i): w for i, w in enumerate(HOC)}},
    ]
    cfg = from_dict({"corpus": {"sources": sources}, "lora": {"target_modules": ["q_proj", "v_proj"]},
                     "eval": {"decoding": "constrained", "batch_size": 4}})
    ckpt = _adapter_checkpoint(model, tok, cfg, base, tmp_path / "ckpt")
    manifest = {"sources": {"ner": {"labels": list(UNTYPED)},
                            "nli": {"labels": ["contradiction", "entailment", "neutral"]},
                            "hoc": {"labels": sorted([*HOC, "none"])}}}
    items = []
    for k, (tokens, tags) in enumerate(test[:6]):
        x = " ".join(tokens)
        items += [
            {"id": f"ner/{k}", "source": "ner", "task": "ner", "input": x, "output": _answer(tokens, _untyped(tags)),
             "instruction": "Tag every disease mention (B, I, O)."},
            {"id": f"nli/{k}", "source": "nli", "task": "nli", "input": x, "output": "neutral",
             "instruction": "Entailment?"},
            {"id": f"hoc/{k}", "source": "hoc", "task": "cls", "input": x, "output": "none",
             "instruction": "Hallmarks?"},
        ]
    # The config crosses to the actor as JSON, as it does in the pool.
    scorer = Scorer(json.loads(json.dumps(to_dict(cfg))), str(base), manifest, items, 0, 1)
    scores = scorer.score(scorer.predict(str(ckpt)))
    assert {name: s["parse_rate"] for name, s in scores.items()} == {"ner": 1.0, "nli": 1.0, "hoc": 1.0}
    assert source_decoding(cfg, manifest) == {"ner": "constrained-tags", "nli": "constrained-choice",
                                              "hoc": "constrained-list"}


def _adapter_checkpoint(model, tok, cfg, base: Path, out: Path) -> Path:
    """A LoRA checkpoint folder as training writes it (adapter, tokenizer, bioray.yaml)."""
    import copy

    from bioray.config import dump
    from bioray.model import add_lora

    peft_model = add_lora(copy.deepcopy(model), cfg)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "bioray.yaml").write_text(dump(cfg))
    return out


# ------------------------------------------------------------------------------ chat templates

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chat_prompts_and_answers_end_with_the_end_of_turn_in_every_decoding(tmp_path):
    """``corpus.template: chat``: the generation prompt, and every answer stops at ``<|im_end|>`` (not EOS)."""
    from bioray.config import from_dict
    from bioray.evaluate.constrained import decode_grammar, grammar_for
    from bioray.evaluate.generate import Generator

    tok = _train_tokenizer(["the patient has asthma : B I O", "tag each token", "entailment neutral"] * 30, 300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    base = tmp_path / "base"
    _llama(tok, 0).save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    cfg = from_dict({"model": {"name_or_path": str(base)}, "corpus": {"template": "chat"}})
    gen = Generator(str(base), cfg)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert gen.format.end == end and gen.format.stop_ids == [end, tok.eos_token_id]
    items = [{"instruction": "Tag each token.", "input": "the patient has asthma"}, {"instruction": "Tag.", "input": "a"}]
    prompts = gen.prompts(items)
    assert prompts[0] == "<|im_start|>user\nTag each token.\n\nthe patient has asthma<|im_end|>\n<|im_start|>assistant\n"
    # A head that always answers with the end of turn: free generation stops there, at once.
    head = torch.nn.Linear(64, len(tok), bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[end] = 10.0
    gen.model.lm_head = head
    assert gen.answer_ids(prompts, [8, 8], 2) == [[end], [end]]
    # Constrained: the grammar ends answers with it, and choices are scored with it.
    spec = answer_spec("ner", items[0]["input"], ["B", "I", "O"])
    walkers = decode_grammar(gen.model, gen.format.encode(tok, prompts[:1]), [grammar_for(tok, spec, end)], 1,
                             tok.pad_token_id, "cpu")
    assert walkers[0].ids[-1] == end and parse_ner(walkers[0].answer, spec.tokens, ["B", "I", "O"]).well_formed
    answers = gen.constrained(prompts, [spec, answer_spec("nli", "a", ["entailment", "neutral"])], [8, 8], 2)
    assert answers[1] in ("entailment", "neutral")
    assert parse_ner(answers[0], spec.tokens, ["B", "I", "O"]).well_formed
