"""Experiment: can LoRA teach an answer-free tiny base the quickstart's tasks (issue 21, item 3)?

The quickstart's base is pretrained on its records, answers included, so its scores show nothing
fine-tuning did. This script measures what happens without the answers, in one process (Ray only
builds the corpus and the tokenised cache):

1. the quickstart's corpus with its NER source swapped for one whose disease and drug names are
   made up (300 and 59 of them), so a name in an answer can only be copied from the input;
2. a tiny base pretrained on the train inputs only (``--pretrain inputs``) or on each input
   written twice (``--pretrain twice``: the repeats are what grows a copying head), and its loss
   per token on a validation sentence written twice, first copy against second (``copy_nll``);
3. LoRA fine-tuning (rank 16 on every linear layer), with the embedding trained too or not
   (``--embeddings``: peft's ``modules_to_save``), scored at every ``--every`` steps on 64
   validation examples per source with free decoding, as the quickstart is.

    python benchmarks/answer_free_quickstart.py --pretrain twice --pretrain-steps 1000 --steps 320 \
        --every 160 --embeddings --out runs/answer-free.json

Results and what they mean: docs/real-data.md, "The quickstart (item 3)".
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_ONSETS = "b c d f g k l m n p r s t v z br cr dr gl pl st tr".split()
_NUCLEI = "a e i o u ae ou".split()
_DISEASE_ENDS = ["itis", "osis", "emia", "oma", "algia", "opathy"]
_DRUG_ENDS = ["mab", "pril", "statin", "olol", "azole", "cillin"]
_PEOPLE = ["the patient", "a woman", "a man", "the child", "her father", "his mother", "an infant", "the donor"]
_FRAMES = [
    "{p} was diagnosed with {d} last year .", "{p} has a history of {d} .",
    "treatment of {d} with {x} was started .", "{p} developed {d} after surgery .",
    "no signs of {d} were found in {p} .", "{x} reduced the risk of {d} .", "{p} with {d} received {x} .",
    "screening for {d} is advised .", "{p} took {x} daily .", "{d} was ruled out in {p} .",
]


def _stem(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) for _ in range(syllables))


def made_up_names(n_diseases: int = 300, n_drugs: int = 60) -> tuple[list[tuple[str, ...]], list[str]]:
    """Disease names (one or two words: "toualgia", "cilou syndrome") and drug names, seeded."""
    rng = random.Random("names")
    diseases: set[tuple[str, ...]] = set()
    while len(diseases) < n_diseases:
        kind = rng.random()
        if kind < 0.6:
            diseases.add((_stem(rng, rng.randint(1, 2)) + rng.choice(_DISEASE_ENDS),))
        elif kind < 0.8:
            diseases.add((_stem(rng, 2), rng.choice(["syndrome", "disease"])))
        else:
            diseases.add((_stem(rng, 2), _stem(rng, 1) + rng.choice(_DISEASE_ENDS)))
    drugs = sorted({_stem(rng, rng.randint(1, 2)) + rng.choice(_DRUG_ENDS) for _ in range(n_drugs)})
    return sorted(diseases), drugs


def write_ner(path: Path, n: int, seed: str) -> None:
    """``n`` sentences in the iob format; 8 of the 10 frames name one made-up disease, 2 none."""
    diseases, drugs = made_up_names()
    rng, lines = random.Random(seed), ["-DOCSTART-\tO", ""]
    for _ in range(n):
        frame, name = rng.choice(_FRAMES), rng.choice(diseases)
        for word in frame.format(p=rng.choice(_PEOPLE), d="\0", x=rng.choice(drugs)).split(" "):
            if word == "\0":
                lines += [f"{w}\t{'B' if i == 0 else 'I'}-Disease" for i, w in enumerate(name)]
            else:
                lines.append(f"{word}\tO")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def _config(work: Path, packing: str = "concatenated"):
    from bioray.config import load

    write_ner(work / "ner_train.tsv", 480, "ner-train")
    write_ner(work / "ner_validation.tsv", 80, "ner-val")
    # The base these measurements were made with (the quickstart's before 2026-12-03): 4 x 256, its
    # pretraining texts run together (--packing isolated is what taught the quickstart's base to copy).
    cfg = load(ROOT / "configs" / "quickstart.yaml", [
        f"run.dir={work / 'run'}", f"data.cache_dir={work / 'cache'}", "model.tiny.pre_tokenizer=trailing_space",
        "model.tiny.hidden_size=256", "model.tiny.num_layers=4", "model.tiny.pretrain_lr=2e-3",
        f"model.tiny.pretrain_packing={packing}",
    ])
    ner = cfg.corpus.sources[0]
    ner.files = {"train": str(work / "ner_train.tsv"), "validation": str(work / "ner_validation.tsv")}
    return cfg


def pretrain_base(cfg, corpus_dir: Path, out: Path, how: str, steps: int) -> float:
    """The tiny base as bioray builds it (tokenizer from the prompts, Llama from the config), pretrained
    on the inputs (``inputs``) or on each input written twice (``twice``). Returns the seconds it took."""
    from bioray import model as M
    from bioray.corpus import read_manifest

    manifest = read_manifest(corpus_dir)
    texts = M._corpus_texts(cfg, corpus_dir, manifest, how)  # bioray's pretrain_on: inputs or twice
    tok = M._train_tokenizer(M._corpus_texts(cfg, corpus_dir, manifest, "prompts"), cfg.model.tiny.vocab_size,
                             cfg.model.tiny.pre_tokenizer)
    cfg.model.tiny.pretrain_steps = steps
    model = M._init_tiny(cfg, tok)
    start = time.time()
    M._pretrain(model, tok, texts, cfg)
    seconds = time.time() - start
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return seconds


def copy_nll(base: Path, sentences: list[str]) -> dict[str, float]:
    """Loss per token of each sentence written twice (``x\\nx``): the first copy, then the second."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    sep = tok("\n", add_special_tokens=False)["input_ids"]
    totals, n = [0.0, 0.0], 0
    for s in sentences:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        x = torch.tensor([[tok.bos_token_id, *ids, *sep, *ids]])
        with torch.no_grad():
            nll = -torch.log_softmax(model(x).logits[0, :-1], -1).gather(1, x[0, 1:, None])[:, 0]
        totals[0] += nll[: len(ids)].sum().item()
        totals[1] += nll[-len(ids):].sum().item()
        n += len(ids)
    return {"first": totals[0] / n, "second": totals[1] / n}


def finetune(cfg, corpus_dir: Path, cache: Path, base: Path, args) -> list[dict]:
    """LoRA on the tokenised cache, scored every ``args.every`` steps; returns one row per score."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bioray.corpus import read_manifest
    from bioray.data import collate, pack_examples
    from bioray.evaluate.generate import Generator
    from bioray.evaluate.pool import eval_items, score_predictions

    torch.manual_seed(0)
    table = pq.read_table(sorted(str(p) for p in (cache / "data").glob("*.parquet"))).to_pydict()
    packed = pack_examples(table["input_ids"], table["labels"], cfg.data.max_seq_len, True, 0)
    rows = [dict(input_ids=i, labels=l, position_ids=p) for i, l, p in zip(*packed.values())]
    gen = Generator(str(base), cfg)
    extra = dict(modules_to_save=["embed_tokens"], ensure_weight_tying=True) if args.embeddings else {}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM", **extra))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup) * max(0.1, 1 - s / args.steps))
    items, manifest = eval_items(cfg, corpus_dir), read_manifest(corpus_dir)
    max_new = [int(len(x) * 1.5) + 8 for x in gen.tokenizer([i["output"] for i in items], add_special_tokens=False)["input_ids"]]
    rng, scores, start = np.random.default_rng(0), [], time.time()
    for step in range(1, args.steps + 1):
        model.train()
        batch = collate([rows[i] for i in rng.integers(len(rows), size=args.rows)], gen.tokenizer.pad_token_id, True)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.every == 0:
            gen.model = model.eval()
            answers = gen.generate(gen.prompts(items), max_new, 32)
            s = score_predictions(cfg, manifest, items, {i["id"]: a for i, a in zip(items, answers)})
            ner = next(a for i, a in zip(items, answers) if i["task"] == "ner")
            scores.append({"step": step, "loss": loss.item(), "seconds": time.time() - start, "eval": s,
                           "first_ner_answer": ner})
            print(json.dumps(scores[-1]), flush=True)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="runs/answer-free", help="corpus, caches and bases go here")
    ap.add_argument("--pretrain", choices=["inputs", "twice"], default="twice")
    ap.add_argument("--pretrain-steps", type=int, default=500)
    ap.add_argument("--packing", choices=["concatenated", "isolated"], default="concatenated",
                    help="model.tiny.pretrain_packing of the base")
    ap.add_argument("--steps", type=int, default=160, help="LoRA steps")
    ap.add_argument("--every", type=int, default=80, help="score every this many steps")
    ap.add_argument("--rows", type=int, default=8, help="packed rows of data.max_seq_len tokens per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--embeddings", action="store_true", help="train the embedding too (peft modules_to_save)")
    args = ap.parse_args()

    import ray
    import torch

    from bioray.data import tokenise
    from bioray.recipes import prepare

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = _config(work, args.packing)
    torch.set_num_threads(2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    corpus_dir = prepare(cfg)
    base = work / f"base-{args.pretrain}-{args.pretrain_steps}-{args.packing}"
    seconds = None
    if not (base / "config.json").is_file():
        seconds = pretrain_base(cfg, corpus_dir, base, args.pretrain, args.pretrain_steps)
    cache, _ = tokenise(cfg, corpus_dir, str(base))
    ray.shutdown()
    from bioray.corpus import read_records

    validation = [r["input"] for r in read_records(corpus_dir, cfg.corpus.sources[0].name, "validation")][:40]
    result = {
        "what": "LoRA on an answer-free tiny base, made-up disease names (benchmarks/answer_free_quickstart.py)",
        "args": vars(args), "pretrain_seconds": seconds, "copy_nll": copy_nll(base, validation),
        "scores": finetune(cfg, corpus_dir, cache, base, args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("pretrain_seconds", "copy_nll")}))


if __name__ == "__main__":
    main()
