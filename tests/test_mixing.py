"""Mixing by weight through Ray Data, determinism, equal batches per worker, the tokenised cache."""

import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from bioray.config import from_dict
from bioray.data import training_dataset
from conftest import ROOT


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    # Workers import this module (the train loop below) and bioray from the checkout.
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_TRAIN_V2_ENABLED": "1"}})
    yield
    ray.shutdown()


def fake_cache(path, sizes: dict[str, int], tasks: dict[str, str] | None = None, seed: int = 0):
    """A tokenised cache whose rows say their source in the first token (source k -> k + 1)."""
    rng = np.random.default_rng(seed)
    rows = {"id": [], "source": [], "task": [], "input_ids": [], "labels": [], "truncated": []}
    for k, (name, n) in enumerate(sizes.items()):
        for i in range(n):
            ids = [k + 1] + rng.integers(10, 100, size=int(rng.integers(5, 40))).tolist()
            rows["id"].append(f"{name}/train/{i:07d}")
            rows["source"].append(name)
            rows["task"].append((tasks or {}).get(name, "ner"))
            rows["input_ids"].append(ids)
            rows["labels"].append([-100] * 3 + ids[3:])
            rows["truncated"].append(False)
    (path / "data").mkdir(parents=True)
    pq.write_table(pa.table(rows), path / "data" / "part-0.parquet", row_group_size=97)
    meta = {"records": sum(sizes.values()), "tokens": 0, "sources": {
        name: {"records": n, "task": (tasks or {}).get(name, "ner"), "dropped_overlong": 0, "truncated": 0, "tokens": 0}
        for name, n in sizes.items()}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def _sources_of(ds, names):
    firsts = [int(r["input_ids"][0]) for r in ds.take_all()]
    return [names[f - 1] for f in firsts]


def test_mixture_proportions_within_2_percent_over_10000_samples(tmp_path):
    sizes = {"a": 3000, "b": 500, "c": 1200}
    cache = fake_cache(tmp_path, sizes)
    weights = {"a": 0.2, "b": 0.5, "c": 0.3}
    cfg = from_dict({"data": {"packing": False},
                     "mixture": {"weights": weights, "replacement": True, "epoch_size": 10000}})
    ds, plan = training_dataset(cfg, cache)
    got = _sources_of(ds, list(sizes))
    assert len(got) == 10000 == sum(plan.values())
    for name, w in weights.items():
        assert abs(got.count(name) / len(got) - w) < 0.02, (name, got.count(name))


def test_mixture_is_deterministic_for_a_seed_and_changes_with_it(tmp_path):
    cache = fake_cache(tmp_path, {"a": 300, "b": 200})
    cfg = from_dict({"data": {"packing": False}, "mixture": {"weights": {"a": 1.0, "b": 1.0}}})
    first = [r["input_ids"].tolist() for r in training_dataset(cfg, cache)[0].take_all()]
    again = [r["input_ids"].tolist() for r in training_dataset(cfg, cache)[0].take_all()]
    other = [r["input_ids"].tolist() for r in training_dataset(cfg, cache, seed=7)[0].take_all()]
    assert first == again
    assert first != other


def test_zero_weight_drops_a_source_and_no_replacement_never_repeats(tmp_path):
    cache = fake_cache(tmp_path, {"a": 300, "b": 200, "c": 50})
    cfg = from_dict({"data": {"packing": False}, "mixture": {"weights": {"a": 1.0, "b": 1.0, "c": 0.0}}})
    ds, plan = training_dataset(cfg, cache)
    rows = [tuple(r["input_ids"].tolist()) for r in ds.take_all()]
    assert plan == {"a": 200, "b": 200}
    assert "c" not in _sources_of(ds, ["a", "b", "c"])
    assert len(set(rows)) == len(rows) == 400


def test_packed_rows_stay_within_max_seq_len(tmp_path):
    cache = fake_cache(tmp_path, {"a": 777})
    cfg = from_dict({"data": {"packing": True, "max_seq_len": 128}})
    rows = training_dataset(cfg, cache)[0].take_all()
    lengths = [len(r["input_ids"]) for r in rows]
    assert max(lengths) <= 128 and sum(lengths) > 0.95 * 128 * len(rows) - 128


def _count_batches(config):
    import torch
    import torch.distributed as dist

    import ray.train

    shard = ray.train.get_dataset_shard("train")
    counts = []
    for _ in range(2):  # two epochs
        counts.append(sum(1 for _ in shard.iter_batches(batch_size=config["micro"], batch_format="numpy")))
    mine = torch.tensor(counts)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    assert all(torch.equal(everyone[0], c) for c in everyone), [c.tolist() for c in everyone]
    assert counts[0] > 0
    ray.train.report({"batches": counts[0]})


def test_every_worker_gets_the_same_number_of_batches(tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cache = fake_cache(tmp_path / "cache", {"a": 333, "b": 101})  # odd sizes, packed rows of varying count
    cfg = from_dict({"data": {"packing": True, "max_seq_len": 64}, "mixture": {"weights": {"a": 1.0, "b": 1.0}}})
    ds, _ = training_dataset(cfg, cache)
    assert ds.count() % 2 == 1, "the test needs an odd number of rows"
    trainer = TorchTrainer(_count_batches, train_loop_config={"micro": 3},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           torch_config=TorchConfig(backend="gloo"), datasets={"train": ds.materialize()},
                           run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="batches"))
    result = trainer.fit()  # raises if the assertions inside a worker failed
    assert result.error is None


def test_tokenised_cache_is_reused_and_keyed_by_what_shapes_it(tmp_path, caplog):
    from bioray.corpus import build_corpus
    from bioray.corpus.sample import write_sample
    from bioray.data import tokenise
    from bioray.model import _corpus_texts, _train_tokenizer
    from bioray.corpus import read_manifest

    sample = write_sample(tmp_path / "sample")
    raw = {"run": {"dir": str(tmp_path / "run"), "quiet": True},
           "corpus": {"sources": [{"name": "ner", "format": "iob", "task": "ner", "entity": "disease",
                                   "files": {"train": str(sample / "ner_train.tsv")}}]},
           "data": {"cache_dir": str(tmp_path / "cache"), "max_seq_len": 256, "tokenise_actors": 1}}
    cfg = from_dict(raw)
    corpus = build_corpus(cfg)
    tok = _train_tokenizer(_corpus_texts(cfg, corpus, read_manifest(corpus), "prompts"), 512)  # as build_tiny does
    tok.save_pretrained(tmp_path / "tok")
    cache, meta = tokenise(cfg, corpus, str(tmp_path / "tok"))
    assert meta["tokenised_now"] == 480 and meta["sources"]["ner"]["records"] == 480
    with caplog.at_level(logging.INFO, logger="bioray"):
        again, meta2 = tokenise(cfg, corpus, str(tmp_path / "tok"))
    assert again == cache and meta2["tokenised_now"] == 0
    assert "tokenised cache hit" in caplog.text
    raw["data"]["max_seq_len"] = 128
    shorter, meta3 = tokenise(from_dict(raw), corpus, str(tmp_path / "tok"))
    assert shorter != cache and meta3["tokenised_now"] > 0
    assert meta3["sources"]["ner"]["records"] + meta3["sources"]["ner"]["dropped_overlong"] == 480
    table = pq.read_table(cache / "data")
    assert set(table.column_names) >= {"id", "source", "input_ids", "labels"}


def test_tiny_base_text_holds_no_answer_unless_asked_and_every_held_out_record_is_scored(tmp_path):
    # pretrain_on: inputs (the default) and prompts never show the base an answer line; records does.
    from bioray.corpus import build_corpus, read_manifest, read_records
    from bioray.corpus.sample import write_sample
    from bioray.evaluate.pool import eval_items
    from bioray.model import _corpus_texts

    sample = write_sample(tmp_path / "sample")
    sources = [{"name": "ner", "format": "iob", "task": "ner", "entity": "disease",
                "files": {"train": str(sample / "ner_train.tsv"), "validation": str(sample / "ner_validation.tsv")}},
               {"name": "nli", "format": "nli", "task": "nli",
                "files": {"train": str(sample / "nli_train.jsonl"), "validation": str(sample / "nli_validation.jsonl")}}]
    cfg = from_dict({"run": {"dir": str(tmp_path / "run"), "quiet": True}, "corpus": {"sources": sources},
                     "eval": {"max_examples": None}})
    assert cfg.model.tiny.pretrain_on == "inputs"
    corpus = build_corpus(cfg)
    manifest = read_manifest(corpus)
    records = read_records(corpus, "ner", "train") + read_records(corpus, "nli", "train")
    answer_lines = {line for r in records for line in r["output"].splitlines()}
    assert any(" : B" in line for line in answer_lines) and "entailment" in answer_lines
    for what in ("inputs", "twice", "prompts"):
        texts = _corpus_texts(cfg, corpus, manifest, what)
        assert len(texts) == len(records) == 960
        assert not [line for t in texts for line in t.splitlines() if line in answer_lines], what
    assert sorted(_corpus_texts(cfg, corpus, manifest)) == sorted(r["input"] for r in records)
    assert sorted(_corpus_texts(cfg, corpus, manifest, "twice")) == sorted(f"{r['input']}\n{r['input']}" for r in records)
    full = _corpus_texts(cfg, corpus, manifest, "records")
    assert sum(line in answer_lines for t in full for line in t.splitlines()) > len(records)
    # eval.max_examples: null (configs/ner-real.yaml) scores every held-out record of every source.
    items = eval_items(cfg, corpus)
    assert len(items) == sum(i["splits"]["validation"]["records"] for i in manifest["sources"].values()) == 160
    assert len({i["id"] for i in items}) == 160


def test_isolated_pretraining_rows_let_each_text_see_only_itself():
    # model.tiny.pretrain_packing: isolated. Positions restart at each text and at each row, and
    # transformers then keeps a text's attention inside it: the second text's logits in a packed row
    # are its logits alone. Run together (concatenated), they are not.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bioray.model import _restarting_positions

    assert _restarting_positions([0, 5, 9], 12, 6).tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 2]]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64)).eval()
    first, second = [1, 7, 8, 9, 2], [1, 9, 8, 7, 6, 2]
    row = torch.tensor([first + second])
    positions = _restarting_positions([0, len(first)], row.shape[1], row.shape[1])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
        isolated = model(input_ids=row, position_ids=positions, use_cache=False).logits[0, len(first):]
        together = model(input_ids=row, use_cache=False).logits[0, len(first):]
    assert torch.allclose(isolated, alone, atol=1e-5)
    assert not torch.allclose(together, alone, atol=1e-3)
