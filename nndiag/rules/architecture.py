"""Architecture rules: what the layout of a model implies before any number is judged.

``post_ln_deep_stack``: a deep stack of post-LN blocks (LayerNorm after each residual add,
as in the original Transformer and BERT). With the LayerNorm on the residual path, the
gradient reaching the early blocks passes through every later LayerNorm; deep post-LN stacks
are known to diverge or stall without learning-rate warm-up, and to train reliably with the
LayerNorm moved to each block's input (pre-LN) (Xiong et al., 2020, "On Layer Normalization in
the Transformer Architecture"; Liu et al., 2020, "Understanding the Difficulty of Training
Transformers"). At init the measured gradients look normal, so this is read from the layout:
in a block, a normalization layer that runs after the attention output is post-LN.
"""

from __future__ import annotations

from nndiag.findings import Finding, FindingId
from nndiag.records import ProbeRecord
from nndiag.records.layers import ATTENTION_ROLES, ROLE_NORM
from nndiag.rules.thresholds import Threshold

# Post-LN blocks from which a stack counts as deep (BERT-base's 12 trains with warm-up; the
# difficulty reported grows with depth, 18+ layers failing without warm-up).
POST_LN_DEEP = 16


def post_ln_blocks(probe: ProbeRecord) -> tuple[list[int], int]:
    """The post-LN blocks, and how many blocks have both attention and normalization."""
    first_attention: dict[int, int] = {}
    first_norm: dict[int, int] = {}
    for record in probe.layers:
        if record.block is None:
            continue
        if record.role in ATTENTION_ROLES:
            first_attention.setdefault(record.block, record.index)
        elif record.role == ROLE_NORM:
            first_norm.setdefault(record.block, record.index)
    judged = [b for b in first_attention if b in first_norm]
    return sorted(b for b in judged if first_norm[b] > first_attention[b]), len(judged)


def post_ln_headline(probe: ProbeRecord) -> dict[str, float | None]:
    """The number of post-LN blocks."""
    return {"post_ln_blocks": float(len(post_ln_blocks(probe)[0]))}


def post_ln_deep_stack(probe: ProbeRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """A stack of at least ``POST_LN_DEEP`` post-LN transformer blocks."""
    post, judged = post_ln_blocks(probe)
    if len(post) < POST_LN_DEEP or len(post) < 0.75 * judged:
        return None
    return Finding(FindingId.POST_LN_DEEP_STACK, "warning", [],
                   f"{len(post)} post-LN transformer blocks: LayerNorm after each residual add",
                   evidence={"post_ln_blocks": len(post), "blocks": judged})
