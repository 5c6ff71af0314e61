"""The jobs, each in one place: its arguments and its body, for ``jobs/*.py`` and the ``bioray`` command.

``python jobs/finetune.py ARGS`` (the form ``ray job submit --working-dir .`` runs) and
``bioray finetune ARGS`` (the console script ``pip install`` puts on the PATH) both call the same
:class:`Command`: ``jobs/<name>.py`` is ``main = commands.script(NAME)``, and :func:`main` is
the ``bioray`` command with one subcommand per entry of :data:`COMMANDS`. The library is imported
inside each body, so ``--help`` and a bad argument answer before Ray or torch load.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bioray import cli
from bioray.config import DATA_ENV, data_root
from bioray.fetch import REGISTRY, UPSTREAM, fetch
from bioray.logs import setup_logging


@dataclass(frozen=True)
class Command:
    """One job: what it does, its arguments, its body."""

    help: str
    """One line: the job's description in ``--help``."""
    arguments: Callable[[argparse.ArgumentParser], None]
    """Adds the job's arguments to a parser."""
    run: Callable[[argparse.Namespace], None]
    """The job, given the parsed arguments; bad input raises a BiorayError (exit 2)."""


def _checks(job: str, **inputs: str | None) -> Callable:
    """The job's input checks (``recipes.check_inputs``), run by ``cli.start`` before Ray starts."""
    from bioray.recipes import check_inputs

    return lambda cfg: check_inputs(cfg, job, **inputs)


def _prepare(args: argparse.Namespace) -> None:
    cfg = cli.start(args, check=_checks("prepare"))
    from bioray.corpus import read_manifest
    from bioray.recipes import prepare

    corpus_dir = prepare(cfg)
    manifest = read_manifest(corpus_dir)
    for name, info in manifest["sources"].items():
        counts = ", ".join(f"{split} {s['records']} (+{s['rejected']} rejected)" for split, s in info["splits"].items())
        print(f"{name} [{info['task']}]: {counts}")
    print(f"corpus: {corpus_dir}")


def _finetune(args: argparse.Namespace) -> None:
    cfg = cli.start(args, check=_checks("finetune"))
    from bioray.recipes import finetune

    result = finetune(cfg)
    print(f"best checkpoint: {result['best_checkpoint']}")
    print(f"result: {Path(cfg.run.dir).resolve() / 'result.json'}")


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    cli.add_config_arguments(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="checkpoint folder (adapter + tokenizer + bioray.yaml)")
    what.add_argument("--predictions", help="JSONL file of {\"id\": ..., \"prediction\": ...}")


def _evaluate(args: argparse.Namespace) -> None:
    cfg = cli.start(args, check=_checks("evaluate", checkpoint=args.checkpoint, predictions=args.predictions))
    from bioray.recipes import evaluate_checkpoint, evaluate_predictions

    if args.checkpoint:
        evaluate_checkpoint(cfg, args.checkpoint)
    else:
        evaluate_predictions(cfg, args.predictions)
    print(f"eval: {Path(cfg.run.dir).resolve() / 'eval.json'}")


def _tune(args: argparse.Namespace) -> None:
    cfg = cli.start(args, check=_checks("tune"))
    from bioray.tune import search

    out = search(cfg)
    tune_dir = Path(cfg.run.dir).resolve() / "tune"
    print(f"trials: {out['trials']} ({out['completed']} completed, {out['stopped_early']} stopped early, "
          f"{out['errors']} failed): {tune_dir / 'trials.csv'}")
    if out["best"] is not None:
        print(f"best: trial {out['best']['trial']}, score {out['best']['score']:.4f}; "
              f"rerun: python jobs/finetune.py --config {out['best']['config']}")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    cli.add_config_arguments(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (adapter + tokenizer + bioray.yaml)")
    p.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")
    p.add_argument("--merge", action="store_true",
                   help="merge LoRA into the base and save a plain Hugging Face model folder (no peft needed)")
    p.add_argument("--base", default=None,
                   help="base model the checkpoint must have been trained on (hub id, folder, or tiny); exit 2 if not; "
                        "--merge needs it (or --config)")


def _export(args: argparse.Namespace) -> None:
    # --config/--set matter here for the model section only: a config that names another base exits 2,
    # and model.trust_remote_code / allow_pickle / revision say how --merge may load the base.
    cfg = cli.config_from(args) if (args.config or args.overrides) else None
    setup_logging(args.quiet)
    from bioray.export import export_checkpoint

    expected = args.base or (cfg.model.name_or_path if cfg is not None else None)
    # How a merge may load the base (trust_remote_code, allow_pickle, revision): this command's
    # config, never the checkpoint's own bioray.yaml.
    out = export_checkpoint(args.checkpoint, args.out, merge=args.merge, expected_base=expected,
                            model=cfg.model if cfg is not None else None)
    print(f"{'merged model' if args.merge else 'adapter'}: {out}")


def _fetch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="+", metavar="NAME", help=f"corpus to download: {', '.join(REGISTRY)}")
    p.add_argument("--mirror", default=None, metavar="URL",
                   help=f"base URL laid out like the upstream repository (URL/data/...), instead of {UPSTREAM}")
    p.add_argument("--dest", default=None, metavar="DIR",
                   help=f"data root to write <DIR>/ner/<NAME>/ into (default: ${DATA_ENV}, else ~/.local/share/bioray)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _fetch(args: argparse.Namespace) -> None:
    setup_logging(args.quiet)
    dest = Path(args.dest).expanduser().resolve() if args.dest else data_root()
    fetch(args.names, dest, mirror=args.mirror)
    print(f"data root: {dest}")


COMMANDS = {
    "prepare": Command("Build the instruction corpus: source files -> records (Parquet) + manifest under "
                       "run.dir/corpus/.", cli.add_config_arguments, _prepare),
    "finetune": Command("Prepare (if needed), train with Ray Train + DeepSpeed LoRA, score every checkpoint, "
                        "write result.json.", cli.add_config_arguments, _finetune),
    "evaluate": Command("Score a checkpoint (generating answers) or a predictions file on the config's corpus; "
                        "write eval.json.", _evaluate_arguments, _evaluate),
    "tune": Command("Ray Tune search over learning rate, LoRA rank and task-mixture weights; writes run.dir/tune/.",
                    cli.add_config_arguments, _tune),
    "export": Command("Export a checkpoint: a clean adapter folder (peft, multi-LoRA servers) or, with --merge, "
                      "a plain HF model.", _export_arguments, _export),
    "data fetch": Command("Download public NER corpora (MTL-Bioinformatics-2016, pinned, sha256-checked) into "
                          "the data root that ${BIORAY_DATA} in configs reads.", _fetch_arguments, _fetch),
}
"""Every job by its ``bioray`` subcommand (``data fetch`` is ``fetch`` under the ``data`` group)."""


def script(name: str) -> Callable[[], None]:
    """A job script's main (``jobs/<name>.py``): parses ``sys.argv`` and runs the command, exit 2 on bad input.

    Args:
        name: A key of :data:`COMMANDS`.
    """
    command = COMMANDS[name]

    @cli.main
    def main() -> None:
        p = cli.ArgumentParser(description=command.help)
        command.arguments(p)
        command.run(p.parse_args())

    return main


def parser() -> argparse.ArgumentParser:
    """The ``bioray`` command's parser: one subcommand per job, ``data fetch`` under ``data``."""
    top = cli.ArgumentParser(prog="bioray", description="Instruction-tune LLMs for biomedical NLP on Ray. "
                             "Each command takes the arguments of its jobs/*.py script.")
    subs = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {}
    for name, command in COMMANDS.items():
        *group, leaf = name.split()
        where = subs
        if group:
            if group[0] not in groups:
                members = [n.split()[1] for n in COMMANDS if n.startswith(f"{group[0]} ")]
                g = subs.add_parser(group[0], help=f"{group[0]} commands: {', '.join(members)}")
                groups[group[0]] = g.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
            where = groups[group[0]]
        p = where.add_parser(leaf, help=command.help, description=command.help)
        command.arguments(p)
        p.set_defaults(run_command=command.run)
    return top


@cli.main
def main() -> None:
    """The ``bioray`` command (console script): ``bioray COMMAND [ARGS]``; ``bioray COMMAND --help``."""
    args = parser().parse_args()
    args.run_command(args)
