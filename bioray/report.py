"""Score tables: bioray's numbers per source, beside published ones where the config gives them."""

from __future__ import annotations

from bioray.config import Config

PRIMARY = {"ner": "f1", "re": "f1", "cls": "f1", "nli": "accuracy", "qa": "accuracy"}


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
        metric = PRIMARY.get(task, "accuracy")
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
