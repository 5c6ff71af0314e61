"""Scoring at the tasks: answer parsers, the paper's metrics, generation and the scorer actor pool."""

from bioray.evaluate.metrics import PRIMARY_METRIC, checkpoint_score, entity_prf, score_source
from bioray.evaluate.parse import parse_label, parse_multilabel, parse_ner

__all__ = ["PRIMARY_METRIC", "checkpoint_score", "entity_prf", "parse_label", "parse_multilabel", "parse_ner",
           "score_source"]
