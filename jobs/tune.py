"""Ray Tune search over learning rate, LoRA rank and task-mixture weights: `bioray tune` as a script (`ray job submit --working-dir .`).

Arguments and body: bioray.commands.COMMANDS["tune"].
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bioray import commands  # noqa: E402

main = commands.script("tune")

if __name__ == "__main__":
    main()
