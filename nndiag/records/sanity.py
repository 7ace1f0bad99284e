"""The pre-training checks' record: what the CI gate measured of the user's training step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SanityRecord:
    """The numbers the pre-training checks measured.

    Attributes:
        loss_at_init: Loss of the first batch before any update.
        expected_loss: What that loss should be for an uninformed model (log C for C-class
            cross-entropy, log 2 for binary), ``None`` when unknown.
        classes: Number of classes, for cross-entropy.
        not_updated: Trainable parameters with a gradient that one optimizer step left equal.
        overfit_losses: Loss of one small batch over the overfitting steps.
        overfit_batch_size: Samples in that batch.
        mixing_ratio: Largest influence of another sample's input on a sample's output,
            relative to its own input's (``None`` when it could not be measured).
        mixing_method: ``gradient`` (float inputs) or ``perturbation`` (integer inputs).
        step_kind: What ran the training step: ``standard`` (nndiag's), ``user`` (the user's
            ``f(model, batch, optimizer)``) or ``lightning`` (``training_step``).
        step_calls: Calls of the step watched for gradients and modes.
        optimizer_steps: ``optimizer.step()`` calls seen during them.
        steps_checked: Optimizer steps followed by a backward pass (whose ``.grad`` was
            checked for the gradient the step applied).
        backward_per_step: Backward passes before the first optimizer step (gradient
            accumulation over k micro-batches: k).
        carried_steps: Optimizer steps whose applied gradient was still in ``.grad`` when the
            next backward pass added to it.
        carried_parameters: The parameters it happened to.
        carried_ratio: Norm of that stale gradient over the norm of the fresh one, at the first
            such backward pass.
        not_updated_reason: Why ``not_updated`` parameters did not move: ``no_step`` (no
            ``optimizer.step()`` call), ``zeroed_before_step`` (their gradient was zero at
            every step although backward produced one) or ``not_in_optimizer``.
        loss_calls: The loss functions the step called on tensors that need a gradient:
            ``name``, ``classes``, ``reduction``, ``input`` (``logits``, ``probabilities``,
            ``log-probabilities``), ``produced_by`` (``softmax``, ``sigmoid``,
            ``log_softmax`` or ``None``) and ``where`` (a module name, ``step`` or ``None``).
        eval_modules: Modules whose behaviour depends on the mode that ran in eval mode.
        eval_kinds: Their classes (``Dropout``, ``BatchNorm1d``...), in the same order.
        eval_root: True when the whole model ran in eval mode.
        mode_changes_output: Whether the model's output differs between the modes it ran in
            and training mode (``None``: not measured).
        batch_size: Samples in the batch the reduction was measured on.
        reduction_ratio: That batch's loss over the batch-weighted mean of its halves' losses.
        reduction_losses: The batch's and the halves' losses.
        heldout: Loss of a held-out batch at init (``init``), after training on the data's
            pairing (``paired``) and on the same batches with shuffled targets (``shuffled``).
        label_steps: Steps of each of those two trainings.
    """

    loss_at_init: float
    expected_loss: float | None = None
    classes: int | None = None
    not_updated: list[str] = field(default_factory=list)
    overfit_losses: list[float] = field(default_factory=list)
    overfit_batch_size: int = 0
    mixing_ratio: float | None = None
    mixing_method: str | None = None
    step_kind: str = "standard"
    step_calls: int = 0
    optimizer_steps: int = 0
    steps_checked: int = 0
    backward_per_step: int | None = None
    carried_steps: int = 0
    carried_parameters: list[str] = field(default_factory=list)
    carried_ratio: float | None = None
    not_updated_reason: str | None = None
    negligible_gradients: dict[str, float] = field(default_factory=dict)
    loss_calls: list[dict[str, Any]] = field(default_factory=list)
    eval_modules: list[str] = field(default_factory=list)
    eval_kinds: list[str] = field(default_factory=list)
    eval_root: bool = False
    mode_changes_output: bool | None = None
    batch_size: int | None = None
    reduction_ratio: float | None = None
    reduction_losses: list[float] = field(default_factory=list)
    heldout: dict[str, float] | None = None
    label_steps: int = 0
