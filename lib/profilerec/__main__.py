"""`python -m profilerec <command> ...` is the `profilerec` command."""

from profilerec.cli.main import main

main()
