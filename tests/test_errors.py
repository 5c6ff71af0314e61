"""Bad input, case by case: every row of docs/errors.md run as a user runs it, and its promise checked.

The table is :data:`CASES`; docs/errors.md is generated from it (``python tests/test_errors.py >
docs/errors.md``) and ``test_the_docs_list_every_case`` keeps the two equal. Each case runs its job
script as a subprocess in a scratch folder (:func:`_scratch`: a small config, its source files, a model
folder, a checkpoint, a predictions file and what an earlier run left there) and must:

- exit 2, with at most 3 lines on stderr, no traceback, and the last line exactly as the table says;
- leave every file that was there byte for byte as it was, and add no file or folder beyond what
  the case names (no partial corpus, cache entry or export, no temporary folder);
- when it is caught before Ray starts (most are), never import torch or ray: a ``sitecustomize`` on
  the child's path writes the modules it imported at exit.

Cases caught once Ray runs (the corpus build, tokenising) start a local Ray each, about 15 s here:
they are marked e2e.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bioray._version import __version__

ROOT = Path(__file__).resolve().parents[1]
BEFORE_RAY, CORPUS, TOKENISE = "before Ray starts", "corpus build (Ray)", "tokenising (Ray)"
SCRIPTS = {"prepare": "prepare.py", "finetune": "finetune.py", "evaluate": "evaluate.py", "tune": "tune.py",
           "export": "export.py", "data fetch": "fetch_data.py"}
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE", "AWS_SECRET_ACCESS_KEY": "fake/secret/key"}


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it, and what bioray must say."""

    job: str
    """A key of :data:`SCRIPTS`."""
    kind: str
    """What sort of input is wrong (config, corpus, model, checkpoint, ...)."""
    mistake: str
    """The mistake, in words (Markdown)."""
    args: tuple[str, ...]
    """The job's arguments, run in the scratch folder."""
    says: str
    """The last line on stderr, exactly; ``{dir}`` is the scratch folder."""
    stage: str = BEFORE_RAY
    """When it is caught."""
    env: dict = field(default_factory=dict)
    """Extra environment variables."""
    files: dict = field(default_factory=dict)
    """Files written into the scratch folder first (path -> text or bytes; ``{dir}`` in text expanded)."""
    writes: tuple[str, ...] = ()
    """Paths (fnmatch patterns) the failed job may add: what it documents writing."""
    real_model: bool = False
    """The case loads the model folder's tokenizer: put a real (tiny) model there."""
    needs: str | None = None
    """A package the case's check needs (an optional extra): the case is skipped without it."""


def _ner(*sentences: str) -> str:
    return "\n\n".join("\n".join(f"{w}\t{'B' if w in ('asthma', 'diabetes') else 'O'}" for w in s.split())
                       for s in sentences) + "\n"


def _re(*rows: tuple[str, object]) -> str:
    return "".join(json.dumps({"sentence": s, "label": lab}) + "\n" for s, lab in rows)


NER_TRAIN = _ner("the patient has asthma .", "no sign of diabetes was found .", "she was treated for asthma .",
                 "diabetes runs in the family .", "the man has diabetes .", "asthma improved .")
RE_TRAIN = _re(("mutations in @GENE$ cause @DISEASE$ .", 1), ("@GENE$ was not linked to @DISEASE$ .", 0),
               ("loss of @GENE$ leads to @DISEASE$ .", 1), ("@GENE$ and @DISEASE$ were studied apart .", 0),
               ("@GENE$ variants raise the risk of @DISEASE$ .", 1))
LONG = " ".join(["asthma", "was", "found"] * 40) + " ."  # 121 tokens: an answer of several hundred tokens

BASE_YAML = """\
run: {dir: run, quiet: true}
corpus:
  sources:
    - {name: ner, format: iob, task: ner, entity: disease,
       files: {train: data/ner_train.tsv, validation: data/ner_validation.tsv}}
    - {name: re, format: re_masked, task: re, labels: {0: "false", 1: "true"},
       files: {train: data/re_train.jsonl, validation: data/re_validation.jsonl}}
model: {name_or_path: tiny}
data: {cache_dir: cache, max_seq_len: 256}
train: {num_workers: 1, max_steps: 2, micro_batch_size: 2}
eval: {max_examples: 2}
"""


def _set(job: str, mistake: str, assignment: str, says: str) -> Case:
    """A config mistake made with one ``--set`` on ``base.yaml``."""
    return Case(job, "config", mistake, ("--config", "base.yaml", "--set", assignment), says)


def _insert(text: str, index: int, line: str, replace: bool = False) -> str:
    """``text`` with ``line`` put in (or in place of) its line ``index`` (0-based)."""
    lines = text.splitlines(True)
    lines[index:index + replace] = [line]
    return "".join(lines)


def _ckpt(base: str = "{dir}/model", **state) -> dict:
    """A checkpoint folder's files as training writes them (weights are never read by these cases)."""
    return {"adapter_config.json": json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}),
            "adapter_model.safetensors": b"\0" * 16, "tokenizer_config.json": "{}",
            "bioray.yaml": "model: {name_or_path: model, revision: null}\n",
            "trainer_state.json": json.dumps({"step": 2, **state})}


def _folder(name: str, files: dict) -> dict:
    return {f"{name}/{k}": v for k, v in files.items()}


# What every scratch folder holds: inputs, and an earlier run's outputs that no failure may touch.
COMMON = {
    "base.yaml": BASE_YAML,
    "data/ner_train.tsv": NER_TRAIN, "data/ner_validation.tsv": _ner("asthma again .", "no diabetes ."),
    "data/re_train.jsonl": RE_TRAIN, "data/re_validation.jsonl": _re(("@GENE$ causes @DISEASE$ .", 1)),
    "preds.jsonl": json.dumps({"id": "ner/validation/0000000", "prediction": "asthma : B"}) + "\n",
    "notes.txt": "my notes\n",
    **_folder("model", {"config.json": "{}", "tokenizer.json": "{}", "model.safetensors": b"\0" * 16}),
    **_folder("ckpt", _ckpt()),
    # An earlier run: its corpus, results, cache entry and an export, all to stay as they are.
    **_folder("run", {"bioray.yaml": "earlier: true\n", "result.json": "{}", "eval.json": "{}",
                      "corpus/manifest.json": json.dumps({"content_hash": "earlier", "sources": {}}),
                      "corpus/part-0.parquet": b"earlier shard"}),
    "cache/tokenised/earlier/meta.json": "{}",
    "exported/adapter_config.json": "{}",
}

CASES: dict[str, Case] = {
    # ------------------------------------------------------------------ config
    "yaml-syntax": Case(
        "prepare", "config", "`bad.yaml` has a list left open on line 3",
        ("--config", "bad.yaml"),
        "bioray: error: bad.yaml:4: invalid YAML (expected ',' or ']', but got '<stream end>'; while parsing a flow "
        "sequence on line 3)",
        files={"bad.yaml": "train:\n  lr: 1e-3\n  max_steps: [1, 2\n"}),
    "unknown-key": _set(
        "finetune", "a misspelt key", "train.lrr=1e-3",
        "bioray: error: config key 'train.lrr': unknown key (expected one of: checkpoint_every, cpus_per_worker, "
        "epochs, full_finetune, grad_accum, grad_clip, gradient_checkpointing, keep_checkpoints, lr, lr_scheduler, "
        "max_failures, max_steps, micro_batch_size, num_workers, offload, optimizer, precision, report_every, "
        "use_gpu, warmup_steps, weight_decay, zero_stage)"),
    "wrong-type": _set(
        "tune", "a word where a number goes", "train.lr=fast",
        "bioray: error: config key 'train.lr': expected a number, got 'fast'"),
    "set-without-value": _set(
        "finetune", "`--set` without `=VALUE`", "train.lr",
        "bioray: error: --set 'train.lr': expected KEY=VALUE"),
    "lora-rank": _set(
        "finetune", "LoRA rank 0", "lora.rank=0",
        "bioray: error: config key 'lora.rank': expected an integer >= 1, got 0"),
    "lora-alpha": _set(
        "tune", "a negative LoRA alpha", "lora.alpha=-8",
        "bioray: error: config key 'lora.alpha': expected a positive number, got -8.0"),
    "lr": _set(
        "finetune", "learning rate 0", "train.lr=0",
        "bioray: error: config key 'train.lr': expected a positive learning rate, got 0.0"),
    "max-steps": _set(
        "finetune", "0 training steps", "train.max_steps=0",
        "bioray: error: config key 'train.max_steps': expected an integer >= 1, got 0"),
    "micro-batch": _set(
        "finetune", "a batch of 0 sequences", "train.micro_batch_size=0",
        "bioray: error: config key 'train.micro_batch_size': expected an integer >= 1, got 0"),
    "eval-batch": Case(
        "evaluate", "config", "an evaluation batch of 0",
        ("--config", "base.yaml", "--predictions", "preds.jsonl", "--set", "eval.batch_size=0"),
        "bioray: error: config key 'eval.batch_size': expected an integer >= 1, got 0"),
    "workers": _set(
        "finetune", "0 training workers", "train.num_workers=0",
        "bioray: error: config key 'train.num_workers': expected an integer >= 1, got 0"),
    "max-seq-len": _set(
        "prepare", "sequences of 8 tokens", "data.max_seq_len=8",
        "bioray: error: config key 'data.max_seq_len': expected an integer >= 16, got 8"),
    "pretrain-on": _set(
        "finetune", "a tiny base pretrained on text bioray does not know", "model.tiny.pretrain_on=answers",
        "bioray: error: config key 'model.tiny.pretrain_on': expected inputs | twice | prompts | records, got 'answers'"),
    "pretrain-packing": _set(
        "finetune", "tiny base pretraining rows packed in a way bioray does not know", "model.tiny.pretrain_packing=mixed",
        "bioray: error: config key 'model.tiny.pretrain_packing': expected isolated | concatenated, got 'mixed'"),
    "pre-tokenizer": _set(
        "finetune", "a tiny base tokenizer bioray does not know", "model.tiny.pre_tokenizer=sentencepiece",
        "bioray: error: config key 'model.tiny.pre_tokenizer': expected bytelevel | words | trailing_space, got 'sentencepiece'"),
    "seed": _set(
        "prepare", "a negative seed", "run.seed=-1",
        "bioray: error: config key 'run.seed': expected an integer >= 0, got -1"),
    "weight-negative": _set(
        "finetune", "a negative mixture weight", "mixture.weights.ner=-1",
        "bioray: error: config key 'mixture.weights.ner': expected a finite weight >= 0, got -1.0"),
    "weight-unknown-source": _set(
        "tune", "a mixture weight for a source that is not there", "mixture.weights.nre=2",
        "bioray: error: config key 'mixture.weights.nre': expected a source name among ['ner', 're'], got 'nre'"),
    "weights-all-zero": _set(
        "finetune", "every mixture weight 0", "mixture.weights={ner: 0, re: 0}",
        "bioray: error: config key 'mixture.weights': expected at least one positive weight, got "
        "{'ner': 0.0, 're': 0.0}"),
    "epoch-size": _set(
        "finetune", "a mixed epoch of 0 records", "mixture.epoch_size=0",
        "bioray: error: config key 'mixture.epoch_size': expected an integer >= 1 or null, got 0"),
    "keep-checkpoints": _set(
        "finetune", "keep 0 checkpoints", "train.keep_checkpoints=0",
        "bioray: error: config key 'train.keep_checkpoints': expected an integer >= 1, got 0"),
    "max-failures": _set(
        "finetune", "a retry count below -1", "train.max_failures=-2",
        "bioray: error: config key 'train.max_failures': expected an integer >= 0, or -1 for no limit, got -2"),
    "eval-score": _set(
        "finetune", "`eval.score` names a metric the source's task does not report", "eval.score=ner/accuracy",
        "bioray: error: config key 'eval.score': expected a metric of ner (ner): f1, precision, recall, parse_rate, "
        "n, got 'ner/accuracy'"),
    "eval-split": Case(
        "evaluate", "config", "`eval.split` that no source has a file for",
        ("--config", "base.yaml", "--predictions", "preds.jsonl", "--set", "eval.split=test"),
        "bioray: error: config key 'eval.split': no source has a 'test' file; set it to one the sources have "
        "(train, validation)"),
    "template-field": _set(
        "prepare", "a prompt template that names a field records do not have",
        'corpus.template="{instruction}\\n{input}\\n{answer}\\n"',
        "bioray: error: config key 'corpus.template': expected fields {instruction} and {input} only (unknown: "
        "{answer}), got '{instruction}\\n{input}\\n{answer}\\n'"),
    "tune-lr-range": _set(
        "tune", "a learning-rate range upside down", "tune.lr=[0.01, 0.0001]",
        "bioray: error: config key 'tune.lr': expected [low, high] with 0 < low <= high, or null, got [0.01, 0.0001]"),
    "tune-rank": _set(
        "tune", "a LoRA rank 0 among the choices", "tune.rank=[0, 8]",
        "bioray: error: config key 'tune.rank': expected a non-empty list of ranks >= 1, or null, got [0, 8]"),
    "tune-space-range": _set(
        "tune", "a search range upside down", "tune.space={train.warmup_steps: {uniform: [10, 1]}}",
        "bioray: error: config key 'tune.space.train.warmup_steps': expected uniform: [low, high], numbers with "
        "low <= high, got [10, 1]"),
    "tune-space-key": _set(
        "tune", "a search over a key built once for the whole search",
        "tune.space={data.max_seq_len: {choice: [128, 256]}}",
        "bioray: error: config key 'tune.space.data.max_seq_len': not searchable: data.max_seq_len is built once "
        "for the whole search (the tokenised cache); searchable keys are train.*, lora.*, mixture.* and data.packing"),
    "tune-nothing": Case(
        "tune", "config", "a search with nothing to search",
        ("--config", "base.yaml", "--set", "tune.lr=null", "--set", "tune.rank=null", "--set", "tune.mixture=false"),
        "bioray: error: config key 'tune': nothing to search (tune.lr, tune.rank and tune.space are null or empty, "
        "and tune.mixture needs two weighted sources)"),
    "run-dir-file": _set(
        "finetune", "`run.dir` names a file", "run.dir=notes.txt",
        "bioray: error: config key 'run.dir': notes.txt is a file; expected a folder for the run's outputs"),
    "no-sources": _set(
        "prepare", "no sources", "corpus.sources=[]",
        "bioray: error: config key 'corpus.sources': expected at least one source, got none"),
    "ner-without-entity": _set(
        "prepare", "a NER source without the entity its instructions name", "corpus.sources.0.entity=null",
        "bioray: error: config key 'corpus.sources[0].entity': expected what the instructions ask to tag (e.g. "
        "disease) for the ner source 'ner', or set its instructions"),
    "sample-dir-foreign": _set(
        "prepare", "`corpus.sample_dir` pointed at a folder of real data (it would be replaced whole)",
        "corpus.sample_dir=data",
        "bioray: error: config key 'corpus.sample_dir': data is not a sample folder bioray wrote (no VERSION file); "
        "point corpus.sample_dir at a new folder (bioray replaces its sample folder whole)"),
    "usage": Case(
        "export", "command line", "a required argument left out", ("--checkpoint", "ckpt"),
        "bioray: error: the following arguments are required: --out (usage: export.py --help)"),
    # ------------------------------------------------------------------ corpus files
    "file-missing": Case(
        "prepare", "corpus", "a source file that is not there",
        ("--config", "base.yaml", "--set", "corpus.sources.0.files.train=data/ner_trian.tsv"),
        "bioray: error: config key 'corpus.sources[0].files.train': file not found: data/ner_trian.tsv"),
    "file-empty": Case(
        "prepare", "corpus", "an empty source file (0 bytes)",
        ("--config", "base.yaml", "--set", "corpus.sources.0.files.train=data/empty.tsv"),
        "bioray: error: config key 'corpus.sources[0].files.train': data/empty.tsv is empty",
        files={"data/empty.tsv": ""}),
    "file-is-folder": Case(
        "prepare", "corpus", "a folder where a source file goes",
        ("--config", "base.yaml", "--set", "corpus.sources.1.files.train=data"),
        "bioray: error: config key 'corpus.sources[1].files.train': data is a folder; expected a re_masked file"),
    "not-utf8": Case(
        "prepare", "corpus", "a Latin-1 byte (`café`) on line 8 of the NER file",
        ("--config", "base.yaml", "--set", "corpus.sources.0.files.train=data/latin1.tsv"),
        "bioray: error: data/latin1.tsv:8: not UTF-8 text (byte 0xe9 at column 4) (1 of 6 records rejected in "
        "ner/train, above corpus.max_rejected_fraction=0.001)",
        stage=CORPUS, files={"data/latin1.tsv": NER_TRAIN.encode().replace(b"\nno\tO", b"\nno\tO\ncaf\xe9\tO", 1)},
        writes=("run/corpus.rejected.jsonl",)),
    "huge-line": Case(
        "prepare", "corpus", "a 10 MB line (a missing line break) in the middle of the RE file",
        ("--config", "base.yaml", "--set", "corpus.sources.1.files.train=data/huge.jsonl"),
        "bioray: error: data/huge.jsonl:3: line is 10485761 bytes, longer than corpus.max_line_bytes (1 of 6 records "
        "rejected in re/train, above corpus.max_rejected_fraction=0.001)",
        stage=CORPUS, files={"data/huge.jsonl": _insert(RE_TRAIN, 2, "x" * (10 << 20) + "\n")},
        writes=("run/corpus.rejected.jsonl",)),
    "broken-line": Case(
        "prepare", "corpus", "a line cut short in the middle of the RE file",
        ("--config", "base.yaml", "--set", "corpus.sources.1.files.train=data/broken.jsonl"),
        "bioray: error: data/broken.jsonl:3: invalid JSON (Expecting value at column 28) (1 of 5 records rejected in "
        "re/train, above corpus.max_rejected_fraction=0.001)",
        stage=CORPUS, files={"data/broken.jsonl": _insert(RE_TRAIN, 2, '{"sentence": "x", "label": \n', replace=True)},
        writes=("run/corpus.rejected.jsonl",)),
    "label-not-in-map": Case(
        "prepare", "corpus", "a label that the source's `labels` map does not have",
        ("--config", "base.yaml", "--set", "corpus.sources.1.files.train=data/label7.jsonl"),
        "bioray: error: data/label7.jsonl:2: label '7' is not in the source's labels map ['0', '1'] (1 of 5 records "
        "rejected in re/train, above corpus.max_rejected_fraction=0.001)",
        stage=CORPUS, files={"data/label7.jsonl": RE_TRAIN.replace('"label": 0}', '"label": 7}', 1)},
        writes=("run/corpus.rejected.jsonl",)),
    "overlong-sentence": Case(
        "finetune", "corpus", "a sentence longer than `data.max_seq_len`, with `data.overlong: error` (the default, "
        "`drop`, drops it and counts it in the cache's meta.json)",
        ("--config", "base.yaml", "--set", "run.dir=run2", "--set", "model.name_or_path=model", "--set",
         "corpus.sources.0.files.train=data/long.tsv", "--set", "data.overlong=error", "--set", "data.max_seq_len=512"),
        "bioray: error: record ner/train/0000006: longer than data.max_seq_len=512 tokens (data.overlong: error; "
        "overlong train records: 1); raise data.max_seq_len, or set data.overlong to drop or truncate",
        stage=TOKENISE, real_model=True, files={"data/long.tsv": NER_TRAIN + "\n" + _ner(LONG)},
        writes=("run2", "run2/*")),
    "source-all-overlong": Case(
        "finetune", "corpus", "a source whose every record is longer than `data.max_seq_len`",
        ("--config", "base.yaml", "--set", "run.dir=run2", "--set", "model.name_or_path=model", "--set",
         "corpus.sources.0.files.train=data/all_long.tsv"),
        "bioray: error: source 'ner': all 2 train records are longer than data.max_seq_len=256 tokens and were "
        "dropped; raise data.max_seq_len, set data.overlong: truncate, or weigh it 0 in mixture.weights",
        stage=TOKENISE, real_model=True, files={"data/all_long.tsv": _ner(LONG, LONG)},
        writes=("run2", "run2/*")),
    # ------------------------------------------------------------------ models
    "model-missing": Case(
        "finetune", "model", "a model folder that is not there",
        ("--config", "base.yaml", "--set", "model.name_or_path=./models/llama"),
        "bioray: error: config key 'model.name_or_path': folder './models/llama' does not exist"),
    "model-pickle-only": Case(
        "finetune", "model", "a model folder with pickle weights only (`pytorch_model.bin`), which can run code",
        ("--config", "base.yaml", "--set", "model.name_or_path=pickled"),
        "bioray: error: config key 'model.name_or_path': {dir}/pickled holds pickle weights only (pytorch_model.bin), "
        "which can run code when loaded; convert them to safetensors, or set model.allow_pickle: true if you trust "
        "them",
        files=_folder("pickled", {"config.json": "{}", "tokenizer.json": "{}", "pytorch_model.bin": b"\x80\x02"})),
    "model-no-tokenizer": Case(
        "tune", "model", "a model folder without a tokenizer",
        ("--config", "base.yaml", "--set", "model.name_or_path=bare"),
        "bioray: error: config key 'model.name_or_path': {dir}/bare has no tokenizer (none of tokenizer.json, "
        "tokenizer_config.json, tokenizer.model, vocab.json)",
        files=_folder("bare", {"config.json": "{}", "model.safetensors": b"\0" * 16})),
    "dataset-split": Case(
        "prepare", "corpus", "a `dataset:` source naming a split the dataset does not have",
        ("--config", "base.yaml", "--set", "corpus.sources.0.files={}", "--set", "corpus.sources.0.dataset=./hf",
         "--set", "corpus.sources.0.splits={train: train, validation: dev}"),
        "bioray: error: config key 'corpus.sources[0].splits.validation': ./hf has no split 'dev' (it has: test, "
        "train)",
        files={"hf/train.jsonl": '{"tokens": ["a"], "tags": ["O"]}\n', "hf/test.jsonl": '{"tokens": ["b"], "tags": ["O"]}\n'}),
    "model-no-chat-template": Case(
        "finetune", "model", "`corpus.template: chat` with a model whose tokenizer has no chat template",
        ("--config", "base.yaml", "--set", "model.name_or_path=plain", "--set", "corpus.template=chat"),
        "bioray: error: config key 'model.name_or_path': {dir}/plain's tokenizer has no chat template, which "
        "corpus.template: chat needs (use a chat/instruct model, or a layout with {instruction} and {input})",
        files=_folder("plain", {"config.json": "{}", "tokenizer.json": "{}", "tokenizer_config.json": "{}",
                                "model.safetensors": b"\0" * 16})),
    # ------------------------------------------------------------------ checkpoints
    "ckpt-missing": Case(
        "evaluate", "checkpoint", "a checkpoint folder that is not there",
        ("--config", "base.yaml", "--checkpoint", "run/checkpoints/step-000040", "--set", "model.name_or_path=model"),
        "bioray: error: {dir}/run/checkpoints/step-000040: checkpoint folder not found"),
    "ckpt-no-weights": Case(
        "evaluate", "checkpoint", "a checkpoint copied half-way: no `adapter_model.safetensors`",
        ("--config", "base.yaml", "--checkpoint", "half", "--set", "model.name_or_path=model"),
        "bioray: error: {dir}/half: incomplete checkpoint, adapter_model.safetensors is missing",
        files=_folder("half", {k: v for k, v in _ckpt().items() if k != "adapter_model.safetensors"})),
    "ckpt-other-base": Case(
        "evaluate", "checkpoint", "a checkpoint made for another base model",
        ("--config", "base.yaml", "--checkpoint", "ckpt", "--set", "model.name_or_path=meta-llama/Llama-2-7b-hf"),
        "bioray: error: {dir}/ckpt: checkpoint was made for base model '{dir}/model', not "
        "'meta-llama/Llama-2-7b-hf' (config key 'model.name_or_path')"),
    "ckpt-newer": Case(
        "evaluate", "checkpoint", "a checkpoint written by a newer bioray",
        ("--config", "base.yaml", "--checkpoint", "newer", "--set", "model.name_or_path=model"),
        "bioray: error: {dir}/newer/trainer_state.json: written by bioray 9.0.0, newer than this bioray " + __version__ + "; "
        "upgrade bioray to read it",
        files=_folder("newer", _ckpt(bioray_version="9.0.0"))),
    "ckpt-revision": Case(
        "evaluate", "checkpoint", "a checkpoint trained on another revision of its base than `model.revision`",
        ("--config", "base.yaml", "--checkpoint", "ckpt", "--set", "model.name_or_path=model", "--set",
         "model.revision=v2"),
        "bioray: error: {dir}/ckpt: trained on the base's default branch, not revision 'v2' (config key "
        "'model.revision'); set model.revision=null"),
    "export-ckpt-missing": Case(
        "export", "checkpoint", "a checkpoint folder that is not there", ("--checkpoint", "ckpt2", "--out", "out"),
        "bioray: error: {dir}/ckpt2: checkpoint folder not found"),
    "export-ckpt-newer": Case(
        "export", "checkpoint", "a checkpoint written by a newer bioray", ("--checkpoint", "newer", "--out", "out"),
        "bioray: error: {dir}/newer/trainer_state.json: written by bioray 10.2.0, newer than this bioray " + __version__ + "; "
        "upgrade bioray to read it",
        files=_folder("newer", _ckpt(bioray_version="10.2.0"))),
    "export-merge-no-base": Case(
        "export", "checkpoint", "`--merge` without `--base`: the base would come from the checkpoint's own files",
        ("--checkpoint", "ckpt", "--out", "out", "--merge"),
        "bioray: error: --merge needs --base MODEL: the base model to merge into, which the checkpoint must have been "
        "made for (ckpt was made for '{dir}/model')"),
    "export-merge-pickle-base": Case(
        "export", "model", "`--merge` onto a base folder with pickle weights only",
        ("--checkpoint", "ckpt-p", "--out", "out", "--merge", "--base", "pickled"),
        "bioray: error: {dir}/ckpt-p: its base model: {dir}/pickled holds pickle weights only (pytorch_model.bin), "
        "which can run code when loaded; convert them to safetensors, or set model.allow_pickle: true if you trust "
        "them",
        files={**_folder("ckpt-p", _ckpt(base="{dir}/pickled")),
               **_folder("pickled", {"config.json": "{}", "tokenizer.json": "{}", "pytorch_model.bin": b"\x80\x02"})}),
    # ------------------------------------------------------------------ export targets
    "export-out-not-empty": Case(
        "export", "export target", "`--out` is a folder with files in it (an earlier export)",
        ("--checkpoint", "ckpt", "--out", "exported"),
        "bioray: error: {dir}/exported: already exists and is not an empty folder; choose a new --out"),
    "export-out-read-only": Case(
        "export", "export target", "`--out` where nothing can be written",
        ("--checkpoint", "ckpt", "--out", "/sys/bioray-out"),
        "bioray: error: /sys/bioray-out: cannot write there (Operation not permitted); choose another --out"),
    # ------------------------------------------------------------------ predictions
    "preds-missing": Case(
        "evaluate", "predictions", "a predictions file that is not there",
        ("--config", "base.yaml", "--predictions", "pred.jsonl"),
        "bioray: error: pred.jsonl: predictions file not found"),
    "preds-broken-line": Case(
        "evaluate", "predictions", "line 2 of the predictions file is not JSON",
        ("--config", "base.yaml", "--predictions", "bad.jsonl"),
        "bioray: error: bad.jsonl:2: expected a JSON object per line",
        files={"bad.jsonl": json.dumps({"id": "ner/validation/0000000", "prediction": "x"}) + "\nnot json\n"}),
    "preds-fields": Case(
        "evaluate", "predictions", "a predictions line without its `prediction`",
        ("--config", "base.yaml", "--predictions", "bad.jsonl"),
        "bioray: error: bad.jsonl:1: expected {\"id\": string, \"prediction\": string}",
        files={"bad.jsonl": json.dumps({"id": "ner/validation/0000000", "answer": "x"}) + "\n"}),
    # ------------------------------------------------------------------ storage
    "storage-scheme": Case(
        "finetune", "storage", "`run.storage` with a scheme nothing can open",
        ("--config", "base.yaml", "--set", "run.storage=ftp://files.example.org/runs"),
        "bioray: error: config key 'run.storage': unknown scheme 'ftp://' in 'ftp://files.example.org/runs' (expected "
        "a local folder, or a URI pyarrow opens: s3://, gs://, abfs://, hdfs://)"),
    "storage-credentials": Case(
        "tune", "storage", "credentials written into `run.storage` (they would land in bioray.yaml)",
        ("--config", "base.yaml", "--set", "run.storage=s3://AKIAFAKE:s3cr3t@bucket/runs"),
        "bioray: error: config key 'run.storage': holds credentials, which bioray.yaml, logs and reports would keep; "
        "give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) instead"),
    "storage-unreachable": Case(
        "finetune", "storage", "`run.storage` on an S3 endpoint that does not answer",
        ("--config", "base.yaml", "--set", "run.storage=s3://bioray-runs/quickstart"),
        "bioray: error: config key 'run.storage': cannot reach 's3://bioray-runs/quickstart' (endpoint "
        "http://127.0.0.1:9 from the environment): NETWORK_CONNECTION during HeadBucket operation: curlCode: 7, "
        "Could not connect to server",
        env={**FAKE_AWS, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}),
    # ------------------------------------------------------------------ trackers
    "track-unknown-key": _set(
        "finetune", "a misspelt tracker key", "track.mlflow.uri=http://127.0.0.1:5000",
        "bioray: error: config key 'track.mlflow.uri': unknown key (expected one of: enabled, experiment, "
        "tracking_uri)"),
    "track-credentials": Case(
        "tune", "tracker", "credentials written into `track.mlflow.tracking_uri` (they would land in bioray.yaml)",
        ("--config", "base.yaml", "--set", "track.mlflow.tracking_uri=https://me:s3cr3t@mlflow.example.org"),
        "bioray: error: config key 'track.mlflow.tracking_uri': holds credentials, which bioray.yaml, logs and "
        "reports would keep; give them in the environment (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD) instead"),
    "track-unreachable": Case(
        "finetune", "tracker", "an MLflow tracking server that does not answer",
        ("--config", "base.yaml", "--set", "track.mlflow.enabled=true", "--set",
         "track.mlflow.tracking_uri=http://127.0.0.1:9"),
        "bioray: error: config key 'track.mlflow.tracking_uri': cannot log to http://127.0.0.1:9: [Errno 111] "
        "Connection refused", needs="mlflow"),
    "track-wandb-no-key": Case(
        "tune", "tracker", "Weights & Biases online with no API key in the environment or `~/.netrc`",
        ("--config", "base.yaml", "--set", "track.wandb.enabled=true"),
        "bioray: error: config key 'track.wandb.mode': online needs WANDB_API_KEY in the environment (or `wandb "
        "login`); or set track.wandb.mode=offline", env={"WANDB_API_KEY": "", "NETRC": "/nonexistent/netrc"},
        needs="wandb"),
    # ------------------------------------------------------------------ environment
    "auth-off": Case(
        "prepare", "environment", "Ray's token authentication turned off", ("--config", "base.yaml"),
        "bioray: error: RAY_AUTH_MODE=disabled: bioray runs Ray with token authentication only; unset it (or set "
        "RAY_AUTH_MODE=token)", env={"RAY_AUTH_MODE": "disabled"}),
    # ------------------------------------------------------------------ data fetch
    "fetch-unknown": Case(
        "data fetch", "corpus name", "a corpus bioray does not know", ("NCBI-disaese", "--dest", "fetched"),
        "bioray: error: unknown corpus 'NCBI-disaese': expected one of NCBI-disease, BC5CDR-chem, BC5CDR-disease, "
        "BC2GM, JNLPBA"),
    "fetch-unreachable": Case(
        "data fetch", "mirror URL", "a mirror that does not answer",
        ("NCBI-disease", "--mirror", "http://127.0.0.1:9", "--dest", "fetched"),
        "bioray: error: http://127.0.0.1:9/data/NCBI-disease-IOB/train.tsv: cannot open ([Errno 111] Connection "
        "refused); nothing written", writes=("fetched", "fetched/*")),
    "fetch-read-only": Case(
        "data fetch", "data root", "`--dest` where nothing can be written",
        ("NCBI-disease", "--dest", "/sys/bioray-data"),
        "bioray: error: /sys/bioray-data: cannot write there (Operation not permitted); choose another --dest"),
}


# ---------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    """A real two-layer model folder (safetensors) whose tokenizer the tokenising cases load."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bioray.model import _train_tokenizer

    out = tmp_path_factory.mktemp("real-model")
    tok = _train_tokenizer([NER_TRAIN, RE_TRAIN], 300)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def import_recorder(tmp_path_factory) -> Path:
    """A folder with a ``sitecustomize`` that writes, at exit, the torch and ray modules the process imported."""
    folder = tmp_path_factory.mktemp("recorder")
    (folder / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "def _record():\n"
        "    with open(os.environ['BIORAY_TEST_IMPORTS'], 'w') as f:\n"
        "        f.write('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))))\n"
        "if os.environ.get('BIORAY_TEST_IMPORTS'):\n"
        "    atexit.register(_record)\n")
    return folder


def _scratch(folder: Path, case: Case) -> None:
    for rel, content in {**COMMON, **case.files}.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{dir}", str(folder)))


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file (its sha256) and folder (``/``) under ``folder``, by relative path."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_dir() and not path.is_symlink():
            out[rel] = "/"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_case(case: Case, folder: Path, recorder: Path, model: Path | None = None) -> subprocess.CompletedProcess:
    _scratch(folder, case)
    if model is not None:
        shutil.rmtree(folder / "model")
        shutil.copytree(model, folder / "model")
    before = _snapshot(folder)
    imports = folder.parent / f"{folder.name}.imports"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(case.env)
    env["BIORAY_TEST_IMPORTS"] = str(imports)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(recorder), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / SCRIPTS[case.job]), *case.args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    proc.snapshot = (before, _snapshot(folder))
    proc.imports = imports.read_text().split() if imports.is_file() else None
    return proc


def _params() -> list:
    return [pytest.param(name, id=name, marks=[pytest.mark.e2e] if case.stage != BEFORE_RAY else [])
            for name, case in CASES.items()]


@pytest.mark.parametrize("name", _params())
def test_bad_input_exits_2_with_one_line_and_writes_nothing(name, tmp_path, import_recorder, request):
    case = CASES[name]
    if case.needs:
        pytest.importorskip(case.needs)
    model = request.getfixturevalue("real_model") if case.real_model else None
    folder = tmp_path / "work"
    folder.mkdir()
    proc = run_case(case, folder, import_recorder, model)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "Traceback" not in proc.stderr and 1 <= len(lines) <= 3, proc.stderr
    assert lines[-1] == case.says.replace("{dir}", str(folder))
    before, after = proc.snapshot
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"earlier files changed or removed: {changed}"
    added = sorted(k for k in after.keys() - before.keys() if not any(fnmatch.fnmatch(k, p) for p in case.writes))
    assert not added, f"left behind: {added}"
    if case.stage == BEFORE_RAY:
        assert proc.imports == [], f"imported before failing: {proc.imports[:5]}"


# ---------------------------------------------------------------------------------------- the docs


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _command(case: Case) -> str:
    env = " ".join(f"{k}={v}" for k, v in case.env.items() if k not in FAKE_AWS)
    args = " ".join(a if a and " " not in a and "{" not in a and "[" not in a else f"'{a}'" for a in case.args)
    return f"`{env + ' ' if env else ''}python jobs/{SCRIPTS[case.job]} {args}`"


def errors_markdown() -> str:
    """docs/errors.md: the table of :data:`CASES`."""
    rows = [f"| {i} | {case.job} | {case.kind} | {_cell(case.mistake)} | {_cell(_command(case))} | "
            f"`{_cell(case.says.replace('{dir}', '<dir>'))}` | {case.stage} |"
            for i, case in enumerate(CASES.values(), 1)]
    early = sum(c.stage == BEFORE_RAY for c in CASES.values())
    return "\n".join([
        "# Bad input: what bioray says",
        "",
        "Generated from `tests/test_errors.py` (`python tests/test_errors.py > docs/errors.md`); a test keeps it in",
        "sync, and every row is a test that runs the command as written.",
        "",
        "Every job answers bad input the same way: **exit status 2, one line on stderr** (`bioray: error: ...`)",
        "naming the config key, or the file and line, and what was expected; no traceback; and **nothing",
        "half-written**: no partial corpus, cache entry, checkpoint or export, and what an earlier run wrote stays",
        "as it was. Progress and everything Ray, DeepSpeed and transformers print go to stdout, so stderr is",
        "the error alone. A bug (anything else) exits 1 with a traceback on stderr; secrets in the",
        "environment (`HF_TOKEN`, `AWS_SECRET_ACCESS_KEY`, a `user:password@` in an endpoint URL) are masked",
        "as `***` in both.",
        "",
        f"Inputs are checked before anything expensive starts: {early} of the {len(CASES)} cases below stop before Ray",
        "starts or any model loads, in well under a second (the test checks that the job never imported torch or",
        "ray). The rest can only be found by reading the corpus (a Ray Data job) or tokenising it.",
        "",
        "Each command ran in a folder (`<dir>`) holding `base.yaml` (two small sources, `ner` and `re`, with",
        "`run.dir: run` and `data.cache_dir: cache`), its `data/` files, a model folder `model/`, a checkpoint",
        "`ckpt/` made for it, `preds.jsonl`, and the outputs of an earlier run (`run/`, `cache/`, `exported/`),",
        "which every case leaves untouched. `data fetch` is `bioray data fetch` (`jobs/fetch_data.py`); `bioray",
        "COMMAND` takes the same arguments as `python jobs/COMMAND.py`.",
        "",
        "| # | job | input | the mistake | command | stderr | caught |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Rejected lines: a corpus line that cannot become a record is rejected and counted; the build stops",
        "only when a split's rejected share is above `corpus.max_rejected_fraction` (default 0.001), naming the",
        "first one (docs/data.md). Rejection messages quote at most 80 characters of the line's own text:",
        "corpora may hold patient text. The failed build's rejections are in `<run.dir>/corpus.rejected.jsonl`.",
        "",
    ])


def test_the_docs_list_every_case():
    assert (ROOT / "docs" / "errors.md").read_text() == errors_markdown() + "\n", \
        "docs/errors.md is stale: python tests/test_errors.py > docs/errors.md"


def test_the_table_has_at_least_35_rows_across_every_entry_point():
    assert len(CASES) >= 35
    assert set(SCRIPTS) <= {c.job for c in CASES.values()}


if __name__ == "__main__":
    print(errors_markdown())
