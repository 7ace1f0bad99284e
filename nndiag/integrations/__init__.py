"""Callbacks for the frameworks most training runs through, each in its own module.

- ``nndiag.integrations.lightning.NndiagCallback``: PyTorch Lightning (``pytorch_lightning``,
  or ``lightning.pytorch`` when only the unified package is installed).
- ``nndiag.integrations.transformers.NndiagCallback``: the Hugging Face ``Trainer``.

Both record one step per optimizer step into a run log (``nndiag check`` / ``nndiag report``
read it), optionally TensorBoard events, and judge the run when training ends. Importing
``nndiag`` or this package imports neither framework: only the module you import does.
"""
