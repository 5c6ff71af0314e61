"""Build the instruction corpus: source files -> records (Parquet) + manifest under run.dir/corpus/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bioray import cli  # noqa: E402


@cli.main
def main() -> None:
    args = cli.parser(__doc__).parse_args()
    cfg = cli.start(args)
    from bioray.corpus import read_manifest
    from bioray.recipes import prepare

    corpus_dir = prepare(cfg)
    manifest = read_manifest(corpus_dir)
    for name, info in manifest["sources"].items():
        counts = ", ".join(f"{split} {s['records']} (+{s['rejected']} rejected)" for split, s in info["splits"].items())
        print(f"{name} [{info['task']}]: {counts}")
    print(f"corpus: {corpus_dir}")


if __name__ == "__main__":
    main()
