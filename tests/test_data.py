"""Tokenising (loss on the answer only), packing (examples stay apart) and mixing by weight."""

import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch

from bioray.config import from_dict
from bioray.data import IGNORE_INDEX, Tokenise, collate, mixture_counts, pack_examples
from bioray.errors import ConfigError
from bioray.model import _train_tokenizer

TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Output:\n"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    texts = ["tag each token : B I O", "the patient has cystic fibrosis .", "fibrosis : B\n. : O"] * 50
    tok = _train_tokenizer(texts, 300)
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _tokenise(tokenizer, max_len=512, overlong="drop", **kw):
    probe = ["### Instruction:\nTag each token.", "the : O\npatient : O\ncystic : B"]
    return Tokenise(tokenizer, TEMPLATE, max_len, overlong, probe=probe, **kw)


def _records(n=3):
    return pa.table({
        "id": [f"s/train/{i:07d}" for i in range(n)], "source": ["s"] * n, "task": ["ner"] * n,
        "instruction": ["Tag each token."] * n,
        "input": ["the patient has cystic fibrosis ."] * n,
        "output": ["the : O\npatient : O\nhas : O\ncystic : B\nfibrosis : I\n. : O"] * n,
    })


def test_labels_mask_the_prompt_and_keep_answer_and_eos(tokenizer):
    fn = _tokenise(tokenizer)
    assert fn.uses_backend
    out = fn(_records())
    tok = tokenizer
    ids, labels = out["input_ids"][0].as_py(), out["labels"][0].as_py()
    assert len(ids) == len(labels)
    answer_start = next(k for k, v in enumerate(labels) if v != IGNORE_INDEX)
    assert all(v == IGNORE_INDEX for v in labels[:answer_start])
    assert labels[answer_start:] == ids[answer_start:]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[answer_start:-1]) == _records()["output"][0].as_py()
    assert tok.decode(ids[1:answer_start]).endswith("### Output:\n")


def test_rust_backend_and_transformers_give_the_same_rows(tokenizer):
    records = _records(5)
    fast = _tokenise(tokenizer, threads=1)
    slow = Tokenise(tokenizer, TEMPLATE, 512, "drop", probe=())  # nothing to check against: transformers
    assert fast.uses_backend and not slow.uses_backend
    a, b = fast(records), pickle.loads(pickle.dumps(slow))(records)
    assert a.equals(b)
    assert a.column_names == ["id", "source", "task", "input_ids", "labels", "truncated"]


class _Shifted:
    """A tokenizer whose Python call does more than its Rust backend (as some slow-path tokenizers do)."""

    def __init__(self, tok):
        self.tok, self.backend_tokenizer = tok, tok.backend_tokenizer
        self.bos_token_id, self.eos_token_id, self.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[i + 1 for i in ids] for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]}


def test_a_backend_that_disagrees_with_the_tokenizer_is_not_used(tokenizer):
    shifted = _Shifted(tokenizer)
    fn = _tokenise(shifted)
    assert not fn.uses_backend
    ids = fn(_records(1))["input_ids"][0].as_py()
    assert ids[1] == tokenizer("### Instruction:", add_special_tokens=False)["input_ids"][0] + 1


def test_overlong_records_drop_or_lose_prompt_never_answer(tokenizer):
    full = _tokenise(tokenizer)(_records(1))
    n = len(full["input_ids"][0].as_py())
    assert len(_tokenise(tokenizer, n - 5)(_records(1))) == 0
    cut = _tokenise(tokenizer, n - 5, "truncate")(_records(1))
    assert cut["truncated"][0].as_py() is True
    assert len(cut["input_ids"][0].as_py()) <= n - 5
    assert cut["input_ids"][0].as_py()[0] == tokenizer.bos_token_id  # the cut is after BOS
    full_labels = [v for v in full["labels"][0].as_py() if v != IGNORE_INDEX]
    assert [v for v in cut["labels"][0].as_py() if v != IGNORE_INDEX] == full_labels


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer_dir):
    """The test tokenizer with ChatML's turn markers and template (as Qwen2.5-Instruct's)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


@pytest.mark.parametrize("system", [None, "You are a biomedical annotator."])
def test_chat_labels_only_the_answer_and_its_end_of_turn(chat_tokenizer, system):
    tok = chat_tokenizer
    probe = ["<|im_start|>user\nTag each token.<|im_end|>", "the : O\npatient : O"]
    fn = Tokenise(tok, "chat", 512, "drop", probe=probe, system_prompt=system)
    assert fn.uses_backend
    rec = _records(1).to_pylist()[0]
    turns = (f"<|im_start|>system\n{system}<|im_end|>\n" if system else "") + \
        f"<|im_start|>user\n{rec['instruction']}\n\n{rec['input']}<|im_end|>\n<|im_start|>assistant\n"
    prompt = tok(turns, add_special_tokens=False)["input_ids"]
    answer = tok(rec["output"], add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    out = fn(_records(1))
    ids, labels = out["input_ids"][0].as_py(), out["labels"][0].as_py()
    # No BOS added (a chat template writes its own); the answer ends with the end of turn, not EOS.
    assert ids == prompt + answer + [end]
    assert labels == [IGNORE_INDEX] * len(prompt) + answer + [end]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and end != tok.eos_token_id
    slow = Tokenise(tok, "chat", 512, "drop", probe=(), system_prompt=system)
    assert not slow.uses_backend and pickle.loads(pickle.dumps(slow))(_records(1)).equals(out)


def test_chat_needs_a_tokenizer_with_a_chat_template(tokenizer):
    from bioray.corpus import PromptFormat

    with pytest.raises(ConfigError, match="corpus.template': chat needs a tokenizer with a chat template"):
        Tokenise(tokenizer, "chat", 512, "drop")
    # A template that ends an assistant turn with plain text: answers end with EOS, as the paper's layout.
    tokenizer = pickle.loads(pickle.dumps(tokenizer))
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert PromptFormat("chat", tokenizer).end == tokenizer.eos_token_id


def test_packing_keeps_every_example_once_within_the_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 120, size=500)
    ids = [np.full(n, k, dtype=np.int32) for k, n in enumerate(lengths)]
    packed = pack_examples(ids, ids, 512, packing=True)
    assert all(len(r) <= 512 for r in packed["input_ids"])
    seen = np.concatenate(packed["input_ids"])
    assert sorted(np.unique(seen)) == list(range(500)) and len(seen) == lengths.sum()
    for row, pos in zip(packed["input_ids"], packed["position_ids"]):
        starts = np.flatnonzero(pos == 0)
        for a, b in zip(starts, list(starts[1:]) + [len(row)]):
            assert len(set(row[a:b])) == 1 and list(pos[a:b]) == list(range(b - a))
    fill = lengths.sum() / (len(packed["input_ids"]) * 512)
    assert fill > 0.97


def test_packed_loss_equals_unpacked_loss_per_example():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=128)).eval()
    a = np.arange(3, 23, dtype=np.int32)
    b = np.arange(30, 45, dtype=np.int32)
    la, lb = a.copy(), b.copy()
    la[:8] = IGNORE_INDEX
    lb[:5] = IGNORE_INDEX
    packed = pack_examples([a, b], [la, lb], 64, packing=True)
    assert len(packed["input_ids"]) == 1
    batch = collate([{k: packed[k][0] for k in packed}], pad_id=0, packing=True)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        row = packed["input_ids"][0]
        sep = [k for k, p in enumerate(packed["position_ids"][0]) if p == 0]
        for s, e in zip(sep, sep[1:] + [len(row)]):
            alone = model(input_ids=torch.tensor(row[s:e])[None].long(), use_cache=False).logits[0]
            assert torch.allclose(logits[s:e], alone, atol=1e-5)


def test_collate_pads_after_real_tokens_and_masks_labels():
    rows = [{"input_ids": np.array([5, 6, 7]), "labels": np.array([-100, 6, 7]), "position_ids": np.array([0, 1, 2])},
            {"input_ids": np.array([8]), "labels": np.array([8]), "position_ids": np.array([0])}]
    batch = collate(rows, pad_id=0, packing=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert "attention_mask" not in batch
    assert collate(rows, pad_id=0, packing=False)["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("packing", [True, False])
def test_answer_logits_give_the_same_loss_and_gradients(packing):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bioray.train import _takes_logit_mask

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.nn.init.normal_(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    assert _takes_logit_mask(model)
    rng = np.random.default_rng(0)
    examples = [rng.integers(3, 97, n).astype(np.int32) for n in (20, 15, 30, 9)]
    labels = [np.where(np.arange(len(e)) < len(e) // 2, IGNORE_INDEX, e).astype(np.int32) for e in examples]
    packed = pack_examples(examples, labels, 48, packing=packing)
    rows = [{k: packed[k][i] for k in packed} for i in range(len(packed["input_ids"]))]
    results = []
    for answer_logits in (False, True):
        model.zero_grad()
        batch = collate(rows, pad_id=0, packing=packing, answer_logits=answer_logits)
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (full, full_grads), (answers, answer_grads) = results
    assert answers == pytest.approx(full, abs=1e-6)
    for a, b in zip(answer_grads, full_grads):
        assert torch.allclose(a, b, atol=1e-6)
    # One logit per answer token: the one from the position before it (the prompt's last for the first).
    keep = collate(rows, pad_id=0, packing=packing, answer_logits=True)["logits_to_keep"]
    assert keep.sum() == sum(len(e) - len(e) // 2 for e in examples)


def _cfg(**mixture):
    return from_dict({"mixture": mixture})


def test_mixture_counts_follow_the_weights():
    counts = {"a": 1000, "b": 300, "c": 50}
    tasks = {"a": "ner", "b": "ner", "c": "nli"}
    plan = mixture_counts(_cfg(weights={"a": 1.0, "b": 1.0, "c": 2.0}), counts, tasks)
    assert plan == {"a": 25, "b": 25, "c": 50}  # without replacement: c runs out first
    plan = mixture_counts(_cfg(weights={"a": 1.0, "b": 1.0, "c": 2.0}, replacement=True, epoch_size=10000),
                          counts, tasks)
    assert plan == {"a": 2500, "b": 2500, "c": 5000}
    assert mixture_counts(_cfg(weights={"c": 0.0}, replacement=True), counts, tasks) == {"a": 650, "b": 650}
    by_task = mixture_counts(_cfg(weights={"ner": 3.0, "nli": 1.0}, by="task", replacement=True, epoch_size=4000),
                             counts, tasks)
    assert by_task["c"] == 1000 and by_task["a"] + by_task["b"] == 3000
    assert by_task["a"] / by_task["b"] == pytest.approx(1000 / 300, rel=0.01)


def test_all_zero_mixture_fails():
    with pytest.raises(ConfigError, match="mixture.weights"):
        mixture_counts(_cfg(weights={"a": 0.0}), {"a": 10}, {"a": "ner"})


def test_words_pre_tokenizer_gives_a_word_the_same_tokens_in_the_sentence_and_at_an_answer_line_start():
    # An NER answer line starts with the word it tags: a GPT-2 pre-tokenizer made " associated" one
    # token in the sentence and "ass|oci|ated" in the answer, so copying a word meant spelling it.
    texts = ["famotidine associated delirium in patients with renal failure ."] * 40
    tok = _train_tokenizer(texts, 400, "words")  # model.tiny.pre_tokenizer: words
    words = ["famotidine", "associated", "delirium", "renal"]
    sentence = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    answer = tok("".join(f"{w} : O\n" for w in words), add_special_tokens=False)["input_ids"]
    for w in words:
        alone = tok(w, add_special_tokens=False)["input_ids"]
        assert len(alone) == 1, (w, tok.convert_ids_to_tokens(alone))  # whole words of the text it learnt
        assert sentence.count(alone[0]) == answer.count(alone[0]) == 1, w
    assert tok.decode(answer) == "".join(f"{w} : O\n" for w in words)  # and text round-trips exactly
    gpt2 = _train_tokenizer(texts, 400)  # bytelevel (the default): the line-start word is other tokens
    assert gpt2("associated", add_special_tokens=False)["input_ids"] != \
        gpt2(" associated", add_special_tokens=False)["input_ids"][-1:]


def test_trailing_space_pre_tokenizer_gives_a_word_one_token_in_the_sentence_and_the_answer_with_fewer_tokens():
    # trailing_space glues the space after a word to it: "associated " in the sentence and at the
    # start of "associated : O" is the same single token, and the space is not a token of its own.
    texts = ["famotidine associated delirium in patients with renal failure ."] * 40
    tok = _train_tokenizer(texts, 400, "trailing_space")  # model.tiny.pre_tokenizer: trailing_space
    words = ["famotidine", "associated", "delirium", "renal"]
    sentence = tok(" ".join(words) + " .", add_special_tokens=False)["input_ids"]
    answer_text = "".join(f"{w} : O\n" for w in words)
    answer = tok(answer_text, add_special_tokens=False)["input_ids"]
    for w in words:
        alone = tok(w + " ", add_special_tokens=False)["input_ids"]
        assert len(alone) == 1, (w, tok.convert_ids_to_tokens(alone))
        assert sentence.count(alone[0]) == answer.count(alone[0]) == 1, w
    assert tok.decode(answer) == answer_text
    assert len(sentence) == len(words) + 1  # four words and the full stop: no space tokens
    words_tok = _train_tokenizer(texts, 400, "words")
    assert len(words_tok(" ".join(words) + " .", add_special_tokens=False)["input_ids"]) > len(sentence)
