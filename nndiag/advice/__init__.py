"""Explanations and fix recommendations, phrased in terms of the user's own architecture.

One registry maps (context kind, finding id) to an advisor ``f(finding, context) ->
(explanation, fixes)``; ``advise`` looks the finding up by the kind of context it was judged on
(a live probe, a checkpoint read without data, a recorded run, the pre-training checks) and
fills its ``explanation`` and ``fixes``. Advisors live in one module per finding family;
the fixes they recommend come from the catalogue (``nndiag.advice.catalog``), most effective
first, each with the torch code to apply it.

Example:
    >>> from nndiag.findings import Finding
    >>> from nndiag.records import SanityRecord
    >>> finding = Finding("cannot_overfit_batch", "error", [], "one batch is not learned",
    ...                   evidence={"batch_size": 8, "steps": 50, "first": 2.3, "best": 2.1})
    >>> [fix.id for fix in advise(finding, SanityRecord(loss_at_init=2.3)).fixes]
    ['raise_learning_rate']
"""

from __future__ import annotations

from typing import Any

from nndiag.advice import (
    activations,
    checkpoint,
    gradients,
    integrity,
    lrcurve,
    run,
    sanity,
)
from nndiag.advice.catalog import make_fix
from nndiag.advice.common import CHECKPOINT, LR_CURVE, PROBE, RUN, SANITY, Advisor
from nndiag.findings import Finding
from nndiag.records import CheckpointRecord, LoadResult, ProbeRecord, SanityRecord
from nndiag.records.lrcurve import LRCurveRecord, TrialsRecord
from nndiag.runlog import RunLog

__all__ = ["REGISTRY", "advise", "advise_checkpoint", "advise_run", "advise_sanity",
           "context_kind"]


def _merge(*families: dict[tuple[str, str], Advisor]) -> dict[tuple[str, str], Advisor]:
    registry: dict[tuple[str, str], Advisor] = {}
    for family in families:
        for key, advisor in family.items():
            if key in registry:
                raise ValueError(f"two advisors for {key}")
            registry[key] = advisor
    return registry


REGISTRY: dict[tuple[str, str], Advisor] = _merge(
    gradients.ADVISORS, activations.ADVISORS, integrity.ADVISORS, sanity.ADVISORS,
    checkpoint.ADVISORS, run.ADVISORS, lrcurve.ADVISORS)
"""(context kind, finding id) -> advisor."""

_KINDS: tuple[tuple[type, str], ...] = (
    (ProbeRecord, PROBE), (CheckpointRecord, CHECKPOINT), (LoadResult, CHECKPOINT), (RunLog, RUN),
    (SanityRecord, SANITY), (LRCurveRecord, LR_CURVE), (TrialsRecord, LR_CURVE))


def context_kind(context: Any) -> str:
    """The kind of context a finding was judged on.

    Args:
        context: A ``ProbeRecord``, ``CheckpointRecord``, ``RunLog`` or ``SanityRecord``.

    Returns:
        ``probe``, ``checkpoint``, ``run`` or ``sanity``.

    Raises:
        TypeError: Any other object.
    """
    for cls, kind in _KINDS:
        if isinstance(context, cls):
            return kind
    raise TypeError(f"no advice for findings judged on a {type(context).__name__}")


def advise(finding: Finding, context: Any) -> Finding:
    """Fill a finding's explanation and fixes from the context it was judged on.

    Args:
        finding: A finding of a rule; an id without an advisor for this context is left as is.
        context: What the rule judged: a ``ProbeRecord``, ``CheckpointRecord``, ``RunLog`` or
            ``SanityRecord``.

    Returns:
        The same finding, filled in.

    Raises:
        TypeError: ``context`` is none of those.
    """
    advisor = REGISTRY.get((context_kind(context), finding.id))
    if advisor is not None:
        finding.explanation, finding.fixes = advisor(finding, context)
        if getattr(context, "pretrained", False):
            _keep_pretrained_weights(finding)
    return finding


# Fixes that overwrite trained weights: never recommended for a pretrained model.
RE_INITIALIZING = frozenset({"he_init", "xavier_init", "orthogonal_init",
                             "non_saturating_activation", "scaled_residual_init"})


def _keep_pretrained_weights(finding: Finding) -> None:
    """Drop re-initializing fixes for pretrained weights, and say why."""
    kept = [fix for fix in finding.fixes if fix.id not in RE_INITIALIZING]
    if len(kept) < len(finding.fixes):
        finding.explanation += (" The weights are pretrained: re-initializing them would throw "
                                "away what they learned, so no re-initialization is suggested.")
    if not kept:
        kept = [make_fix("lower_learning_rate"), make_fix("lr_warmup")]
    finding.fixes = kept


def advise_checkpoint(finding: Finding, record: CheckpointRecord) -> Finding:
    """Fill a data-free finding's explanation and fixes from the checkpoint record."""
    return advise(finding, record)


def advise_run(finding: Finding, log: RunLog) -> Finding:
    """Fill the explanation and fixes of a finding over a recorded run."""
    return advise(finding, log)


def advise_sanity(finding: Finding, record: SanityRecord) -> Finding:
    """Fill the explanation and fixes of a pre-training sanity finding."""
    return advise(finding, record)
