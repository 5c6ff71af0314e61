"""Score tables: bioray's numbers per source, beside published ones where the config gives them."""

from __future__ import annotations

from pathlib import Path

from bioray.config import Config
from bioray.evaluate.metrics import PRIMARY_METRIC


def score_table(cfg: Config, results: dict, split: str | None = None) -> str:
    """A Markdown table: one row per source, metrics in percent, references beside them.

    Args:
        cfg: The config (source tasks and ``reference`` scores).
        results: ``{source: {metric: value}}`` as in ``eval.json``.
        split: The split the scores were computed on (named in the header).
    """
    sources = {s.name: s for s in cfg.corpus.sources}
    ref_cols: list[str] = []
    for name in results:
        for key in (sources[name].reference or {}) if name in sources else ():
            if key != "metric" and key not in ref_cols:
                ref_cols.append(key)
    split = split or cfg.eval.split
    head = ["source", "task", "metric", f"bioray ({split})", "parse rate", "n", *ref_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results.items():
        src = sources.get(name)
        task = src.task if src else "?"
        metric = PRIMARY_METRIC.get(task, "accuracy")
        ref = (src.reference or {}) if src else {}
        refs = [_fmt_ref(ref.get(c)) for c in ref_cols]
        lines.append("| " + " | ".join([name, task, metric, _pct(m.get(metric)), _pct(m.get("parse_rate")),
                                        str(m.get("n", "")), *refs]) + " |")
    return "\n".join(lines)


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def _fmt_ref(v) -> str:
    if v is None:
        return ""
    if isinstance(v, dict):  # {name: BioBERT, score: 88.62}
        return f"{v.get('score', '')} ({v.get('name', '')})"
    return str(v)


# ---------------------------------------------------------------------------- run report


def run_report(cfg: Config, result: dict, records: list[dict], curves: str | None = "curves.png") -> str:
    """``run.dir/report.md``: scores beside the references, the best checkpoint, the run's settings.

    Args:
        cfg: The run's config.
        result: The content of ``result.json``.
        records: The records of ``metrics.jsonl`` (see ``bioray.observe``).
        curves: The curves image, relative to the report (None: no image).
    """
    best = result.get("best_checkpoint") or ""
    evals = [r for r in records if r.get("kind") == "eval"]
    best_step = next((c.get("step") for c in result.get("checkpoints", []) if c.get("path") == best), None)
    score = result.get("score")
    lines = [f"# bioray run: `{cfg.run.dir}`", ""]
    lines += [f"Best checkpoint: `{best}`" + (f" (step {best_step}" if best_step is not None else "")
              + (f", task score {100 * score:.2f}, `eval.score` = {cfg.eval.score})" if score is not None
                 else ")" if best_step is not None else ""), ""]
    n = cfg.eval.max_examples
    refs = any(s.reference for s in cfg.corpus.sources)
    lines += [f"Scores of the best checkpoint on the **{result.get('split', cfg.eval.split)}** split "
              f"({'all' if n is None else f'at most {n}'} examples per source, {cfg.eval.decoding} decoding), "
              "in percent." + (" Reference columns are the published numbers in each source's `reference` "
                               "(Rohanian et al. 2024's Llama-2 7B/13B and the encoder baseline, as published; their "
                               "released evaluation reads the devel splits)."
                               if refs else ""), ""]
    lines += [score_table(cfg, result.get("eval", {}), result.get("split")), ""]
    if curves:
        lines += [f"![loss and task score against step]({curves})", ""]
    if evals:
        kept = {Path(c["path"]).name for c in result.get("checkpoints", []) if c.get("path")}
        sources = list(evals[-1].get("eval", {}))
        tasks = {s.name: s.task for s in cfg.corpus.sources}
        head = ["step", "checkpoint", "task score", *[f"{s} {PRIMARY_METRIC.get(tasks.get(s), 'accuracy')}" for s in sources],
                "kept"]
        lines += ["## Every scored checkpoint", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sorted(evals, key=lambda r: r["step"]):
            name = r.get("checkpoint") or ""
            mark = "best" if name and name == Path(best).name else "yes" if name in kept else "deleted"
            cells = [str(r["step"]), f"`{name}`", _pct(r.get("score")),
                     *[_pct(r.get("eval", {}).get(s, {}).get(PRIMARY_METRIC.get(tasks.get(s), "accuracy"))) for s in sources],
                     mark]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    tr = result.get("train", {})
    lines += ["## Training", "",
              f"{tr.get('steps')} steps, loss {_num(tr.get('first_loss'))} -> {_num(tr.get('last_loss'))}, "
              f"{_num(tr.get('tokens_per_s'), '.0f')} tokens/s over the run, {tr.get('seconds')} s "
              "(training and scoring).", ""]
    lines += ["## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in run_settings(cfg, result).items()]
    lines += ["", "Full resolved config: `bioray.yaml`; every report: `metrics.jsonl`, "
              "`tensorboard --logdir " + str(Path(cfg.run.dir) / "tensorboard") + "`.", ""]
    return "\n".join(lines)


def run_settings(cfg: Config, result: dict | None = None) -> dict[str, str]:
    """The settings a reader compares runs by, as ``{name: text}``."""
    t, lo, m = cfg.train, cfg.lora, cfg.model
    model = f"`{m.name_or_path}`"
    if m.name_or_path == "tiny":
        s = m.tiny
        model += f" (Llama, {s.num_layers} layers, hidden {s.hidden_size}, vocab {s.vocab_size})"
    plan = (result or {}).get("mixture") or {}
    weights = {s.name: cfg.source_weight(s.name) for s in cfg.corpus.sources}
    mixture = ", ".join(f"{name} {w:g}" + (f" ({plan[name]} records/epoch)" if name in plan else "")
                        for name, w in weights.items())
    out = {
        "model": model,
        "steps": str(t.max_steps),
        "learning rate": f"{t.lr:g}, {t.warmup_steps} warmup steps, cosine to 10%",
        "batch": f"{t.num_workers} workers x {t.micro_batch_size} sequences x {t.grad_accum} accumulation, "
                 f"{cfg.data.max_seq_len} tokens" + (", packed" if cfg.data.packing else ""),
        "adapter": "full fine-tune" if t.full_finetune else
                   f"LoRA rank {lo.rank}, alpha {lo.alpha:g}, dropout {lo.dropout:g}, "
                   f"on {', '.join(lo.target_modules)}",
        "DeepSpeed": f"ZeRO-{t.zero_stage}" + (", CPU offload" if t.offload else "")
                     + (", GPU" if t.use_gpu else ", CPU"),
        "mixture": f"{mixture} (by {cfg.mixture.by}" + (", with replacement)" if cfg.mixture.replacement else ")"),
        "decoding": f"{cfg.eval.decoding}, {'greedy' if cfg.eval.num_beams == 1 else f'{cfg.eval.num_beams} beams'}",
        "eval": f"split {cfg.eval.split}, "
                + ("all" if cfg.eval.max_examples is None else f"{cfg.eval.max_examples}") + " examples per source",
        "seed": str(cfg.run.seed),
    }
    return out


def write_curves(records: list[dict], path: Path, title: str = "") -> None:
    """``curves.png``: training loss and task score (and each source's primary metric) against step."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file, on any machine
    import matplotlib.pyplot as plt

    train = sorted((r for r in records if r.get("kind") == "train" and r.get("loss") is not None),
                   key=lambda r: r["step"])
    evals = sorted((r for r in records if r.get("kind") == "eval"), key=lambda r: r["step"])
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], marker=".", color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_loss.grid(alpha=0.3)
    if evals:
        ax_score.plot([r["step"] for r in evals], [100 * r["score"] if r.get("score") is not None else float("nan")
                                                   for r in evals], marker="o", lw=2, color="black", label="task score")
        for source in evals[-1].get("eval", {}):
            metric = next((k for k in ("f1", "accuracy") if k in evals[-1]["eval"][source]), None)
            if metric:
                ax_score.plot([r["step"] for r in evals],
                              [100 * r["eval"].get(source, {}).get(metric, float("nan")) for r in evals],
                              marker=".", ls="--", label=f"{source} {metric}")
        ax_score.legend(fontsize=7, loc="lower right")
    ax_score.set(xlabel="step", ylabel="percent", title="task scores of the checkpoints", ylim=(0, 102))
    ax_score.grid(alpha=0.3)
    if train:
        for ax in (ax_loss, ax_score):
            ax.set_xlim(0, max(r["step"] for r in train + evals) * 1.03)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(v, fmt: str = ".4f") -> str:
    return "?" if v is None else format(v, fmt)
