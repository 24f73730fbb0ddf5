"""``python -m surgery_edge.cli``: the command line, as torchrun starts it on every rank."""

from surgery_edge.cli.app import main

main()
