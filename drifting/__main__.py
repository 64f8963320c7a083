"""`python -m drifting <command>`: the same as the `drifting` console script."""

from drifting.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
