"""Score a checkpoint (generating answers) or a predictions file on the config's corpus; write eval.json."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bioray import cli  # noqa: E402


@cli.main
def main() -> None:
    p = cli.parser(__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="checkpoint folder (adapter + tokenizer + bioray.yaml)")
    what.add_argument("--predictions", help="JSONL file of {\"id\": ..., \"prediction\": ...}")
    args = p.parse_args()
    cfg = cli.start(args)
    from bioray.recipes import evaluate_checkpoint, evaluate_predictions

    if args.checkpoint:
        evaluate_checkpoint(cfg, args.checkpoint)
    else:
        evaluate_predictions(cfg, args.predictions)
    print(f"eval: {Path(cfg.run.dir).resolve() / 'eval.json'}")


if __name__ == "__main__":
    main()
