"""Ray Tune search over learning rate, LoRA rank and task-mixture weights; writes run.dir/tune/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bioray import cli  # noqa: E402


@cli.main
def main() -> None:
    args = cli.parser(__doc__).parse_args()
    cfg = cli.start(args)
    from bioray.tune import search

    out = search(cfg)
    tune_dir = Path(cfg.run.dir).resolve() / "tune"
    print(f"trials: {out['trials']} ({out['completed']} completed, {out['stopped_early']} stopped early, "
          f"{out['errors']} failed): {tune_dir / 'trials.csv'}")
    if out["best"] is not None:
        print(f"best: trial {out['best']['trial']}, score {out['best']['score']:.4f}; "
              f"rerun: python jobs/finetune.py --config {out['best']['config']}")


if __name__ == "__main__":
    main()
