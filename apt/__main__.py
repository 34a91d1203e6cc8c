"""``python -m apt``: the command-line interface."""

from apt.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
