"""The parts of the CI gate (``nndiag.training_check.check_training``), one concern each.

- ``steps``: running a training step (the user's own, a Lightning module's, or nndiag's) and
  giving each phase of the gate a fresh step and optimizer;
- ``observers``: watching a step from outside (gradient, optimizer and module hooks; the loss
  functions it calls and their inputs);
- ``sanity``: the pre-training sanity measurements through the step (watched calls, loss
  reduction, overfitting one batch, shuffled labels, batch mixing);
- ``batches``: collecting, counting, slicing and shuffling batches as the step receives them.
"""
