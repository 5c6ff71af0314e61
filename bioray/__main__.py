"""``python -m bioray COMMAND [ARGS]``: the ``bioray`` command without the console script."""

from bioray.commands import main

if __name__ == "__main__":
    main()
