"""Root-cause links: a finding that, when found, explains others found beside it.

One table, keyed by finding id as the rules and the advisors are: a bug in the training code
(``zero_grad_missing``, ``softmax_before_loss``...) makes the loss and the gradients look like
a learning-rate problem; BatchNorm gains drawn like weights (``poor_initialization`` with the
``norm_gains`` mechanism) make the gradient vanish. ``link_causes`` tags each symptom with its
cause (``evidence["explained_by"]``), starts its explanation by naming the cause, and trims the
fixes that would treat the symptom instead of the cause.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nndiag.findings import Finding, FindingId, severity_rank

F = FindingId
# Changing the learning rate does not fix a bug in the training code.
LR_FIXES = frozenset({"raise_learning_rate", "lower_learning_rate", "lr_warmup"})
# Re-initializing Linear/conv weights does not cure a cause in the normalization gains.
WEIGHT_REINIT = frozenset({"he_init", "xavier_init"})


@dataclass(frozen=True)
class CauseLink:
    """One cause and the symptoms it explains.

    Attributes:
        cause: The finding that is the cause.
        symptoms: The findings it explains.
        mechanism: Only when the cause's evidence names this mechanism.
        drops: The symptoms' fixes that do not treat the cause.
        leads: The cause's fixes go first among the symptom's fixes.
        quiets: A symptom of a cause at ``error`` is lowered to ``info`` (the report still
            fails, on the cause).
    """

    cause: FindingId
    symptoms: tuple[FindingId, ...]
    mechanism: str | None = None
    drops: frozenset[str] = LR_FIXES
    leads: bool = False
    quiets: bool = True


# (A step that cannot train makes the labels check fail too: training on the data's pairing
# then beats shuffled targets no more than a broken step allows.)
LINKS: tuple[CauseLink, ...] = (
    CauseLink(F.ZERO_GRAD_MISSING, (F.LOSS_DIVERGING, F.LOSS_OSCILLATING, F.LOSS_NOT_DECREASING,
                                    F.EXPLODING_GRADIENTS, F.UPDATE_RATIO_HIGH, F.DEAD_RELU,
                                    F.CANNOT_OVERFIT_BATCH, F.LABELS_MISALIGNED)),
    CauseLink(F.SOFTMAX_BEFORE_LOSS, (F.CANNOT_OVERFIT_BATCH, F.LOSS_NOT_DECREASING,
                                      F.UPDATE_RATIO_LOW, F.LABELS_MISALIGNED)),
    CauseLink(F.TRAIN_MODE_OFF, (F.CANNOT_OVERFIT_BATCH, F.LOSS_NOT_DECREASING,
                                 F.LABELS_MISALIGNED)),
    CauseLink(F.LOSS_REDUCTION_SUM, (F.LOSS_DIVERGING, F.LOSS_OSCILLATING,
                                     F.EXPLODING_GRADIENTS, F.UPDATE_RATIO_HIGH, F.DEAD_RELU)),
    CauseLink(F.LABELS_MISALIGNED, (F.LOSS_NOT_DECREASING,)),
    CauseLink(F.PARAMETERS_NOT_UPDATED, (F.LOSS_NOT_DECREASING, F.UPDATE_RATIO_LOW,
                                         F.CANNOT_OVERFIT_BATCH, F.LABELS_MISALIGNED)),
    CauseLink(F.BATCH_MIXING, (F.CANNOT_OVERFIT_BATCH, F.LOSS_NOT_DECREASING,
                               F.LABELS_MISALIGNED)),
    # Inputs far from unit scale push every layer after the first off its initialized scale.
    CauseLink(F.INPUTS_NOT_NORMALIZED, (F.EXPLODING_GRADIENTS, F.VANISHING_GRADIENTS,
                                        F.DEAD_RELU, F.SATURATED_ACTIVATIONS,
                                        F.POOR_INITIALIZATION, F.LOSS_AT_INIT_UNEXPECTED),
              drops=LR_FIXES | WEIGHT_REINIT, leads=True),
    # Gains near zero shrink the signal and the gradient at every normalization.
    CauseLink(F.POOR_INITIALIZATION, (F.VANISHING_GRADIENTS, F.EXPLODING_GRADIENTS),
              mechanism="norm_gains", drops=WEIGHT_REINIT, leads=True, quiets=False),
)


def _causes(finding: Finding) -> list[CauseLink]:
    return [link for link in LINKS if link.cause == finding.id
            and (link.mechanism is None or finding.evidence.get("mechanism") == link.mechanism)]


def link_causes(findings: list[Finding]) -> list[Finding]:
    """Tag the findings that a root cause found alongside them explains.

    A symptom gets ``evidence["explained_by"]`` (its causes, most severe first), an
    explanation that starts by naming the most severe cause, and loses the fixes that treat
    the symptom rather than the cause (``CauseLink``). A symptom already explained is left as
    is, so linking twice changes nothing.

    Args:
        findings: Findings of one report (any context or phase), advised already.

    Returns:
        The same findings, most severe first.
    """
    causes = [(cause, link) for cause in findings for link in _causes(cause)]
    for finding in findings:
        if "explained_by" in finding.evidence:
            continue
        explained = sorted(((c, link) for c, link in causes
                            if c is not finding and finding.id in link.symptoms),
                           key=lambda pair: -severity_rank(pair[0].severity))
        if not explained:
            continue
        cause, link = explained[0]
        finding.evidence["explained_by"] = list(dict.fromkeys(c.id for c, _ in explained))
        finding.explanation = (f"Probably a consequence of {cause.id} ({cause.summary}; see "
                               "it): fix that first."
                               + (f" {finding.explanation}" if finding.explanation else ""))
        kept = [fix for fix in finding.fixes if fix.id not in link.drops]
        if link.leads:  # copies: each finding's fix is verified against its own headline
            kept = [replace(fix) for fix in cause.fixes] + [
                fix for fix in kept if fix.id not in {x.id for x in cause.fixes}]
        finding.fixes = kept
        if link.quiets and cause.severity == "error":
            finding.severity = "info"
    return sorted(findings, key=lambda f: -severity_rank(f.severity))
