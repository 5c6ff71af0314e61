"""Prepare (if needed), train with Ray Train + DeepSpeed LoRA, score every checkpoint, write result.json."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bioray import cli  # noqa: E402


@cli.main
def main() -> None:
    args = cli.parser(__doc__).parse_args()
    cfg = cli.start(args)
    from bioray.recipes import finetune

    result = finetune(cfg)
    print(f"best checkpoint: {result['best_checkpoint']}")
    print(f"result: {Path(cfg.run.dir).resolve() / 'result.json'}")


if __name__ == "__main__":
    main()
