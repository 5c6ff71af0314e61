"""Download public NER corpora into the data root: `bioray data fetch` as a script (`ray job submit --working-dir .`).

Arguments and body: bioray.commands.COMMANDS["data fetch"].
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bioray import commands  # noqa: E402

main = commands.script("data fetch")

if __name__ == "__main__":
    main()
