"""`python -m profilerec <command> ...` is the `profilerec` command."""

from profilerec.cli import main

main()
