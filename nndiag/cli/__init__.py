"""The ``nndiag`` command line (the only place that knows about typer)."""
