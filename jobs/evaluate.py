"""Score a checkpoint or a predictions file; write eval.json: `bioray evaluate` as a script (`ray job submit --working-dir .`).

Arguments and body: bioray.commands.COMMANDS["evaluate"].
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bioray import commands  # noqa: E402

main = commands.script("evaluate")

if __name__ == "__main__":
    main()
