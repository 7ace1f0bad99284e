"""``python -m nndiag``: the same as the ``nndiag`` command."""

from nndiag.cli.app import main

main()
