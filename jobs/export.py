"""Export a checkpoint: a clean adapter folder (peft, multi-LoRA servers) or, with --merge, a plain HF model."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bioray import cli  # noqa: E402
from bioray.logs import setup_logging  # noqa: E402


@cli.main
def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (adapter + tokenizer + bioray.yaml)")
    p.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")
    p.add_argument("--merge", action="store_true",
                   help="merge LoRA into the base and save a plain Hugging Face model folder (no peft needed)")
    p.add_argument("--base", default=None,
                   help="base model the checkpoint must have been trained on (hub id or folder); exit 2 if not")
    args = p.parse_args()
    # --config/--set only matter here for model.name_or_path: a config that names another base exits 2.
    cfg = cli.config_from(args) if (args.config or args.overrides) else None
    setup_logging(args.quiet)
    from bioray.export import export_checkpoint

    expected = args.base or (cfg.model.name_or_path if cfg is not None else None)
    out = export_checkpoint(args.checkpoint, args.out, merge=args.merge, expected_base=expected)
    print(f"{'merged model' if args.merge else 'adapter'}: {out}")


if __name__ == "__main__":
    main()
