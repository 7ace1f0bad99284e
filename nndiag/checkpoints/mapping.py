"""Loading checkpoint weights into the user's architecture, mapping a wrapper prefix."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nndiag.checkpoints.formats import Checkpoint
from nndiag.errors import UsageError
from nndiag.records.checkpoint import LoadResult


def _prefixes(key: str) -> list[str]:
    """``a.b.c`` -> ``["a.", "a.b."]``: candidate wrapper prefixes of a key."""
    parts = key.split(".")
    return [".".join(parts[:i]) + "." for i in range(1, len(parts))]


def match_keys(checkpoint_keys: list[str], model_keys: list[str]) -> tuple[str, str]:
    """Find ``(remove, add)`` prefixes that make the key sets equal, or ``("", "")``.

    Handles a LightningModule attribute (``net.``), DataParallel/DDP (``module.``),
    ``torch.compile`` (``_orig_mod.``) and a model that wraps the saved one.
    """
    ckpt, model = set(checkpoint_keys), set(model_keys)
    if ckpt == model or not ckpt or not model:
        return "", ""
    first = checkpoint_keys[0]
    for prefix in _prefixes(first):
        if all(k.startswith(prefix) for k in ckpt) and {k[len(prefix):] for k in ckpt} == model:
            return prefix, ""
    for prefix in _prefixes(model_keys[0]):
        if {prefix + k for k in ckpt} == model:
            return "", prefix
    return "", ""


def load_into(model: nn.Module, checkpoint: Checkpoint, *, strict: bool = True,
              progress: Callable[[int, int], None] | None = None) -> LoadResult:
    """Load the checkpoint's weights into ``model`` (strict by default).

    When the only difference between the key sets is a wrapper prefix, it is mapped.

    Raises:
        UsageError: Keys do not match (strict), or a tensor's shape differs from the model's.
    """
    model_state = model.state_dict()
    names = [entry.name for entry in checkpoint.entries]
    remove, add = match_keys(names, list(model_state))
    result = LoadResult(prefix_removed=remove, prefix_added=add)
    mapped = {add + name[len(remove):]: entry for name, entry in
              zip(names, checkpoint.entries, strict=True)}
    result.missing = [k for k in model_state if k not in mapped]
    result.unexpected = [k for k in mapped if k not in model_state]
    if strict and (result.missing or result.unexpected):
        raise UsageError(
            f"the checkpoint does not fit --model: {_summarize('missing', result.missing)}"
            f"{'; ' if result.missing and result.unexpected else ''}"
            f"{_summarize('unexpected', result.unexpected)}. Pass --non-strict to load the "
            "keys that match and report the rest"
        )
    mismatched = [f"{k}: checkpoint {tuple(e.shape)} vs model {tuple(model_state[k].shape)}"
                  for k, e in mapped.items()
                  if k in model_state and tuple(e.shape) != tuple(model_state[k].shape)]
    if mismatched:
        raise UsageError("the checkpoint's tensor shapes differ from --model: "
                         + "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else ""))
    total = sum(e.nbytes for k, e in mapped.items() if k in model_state)
    done = 0
    with torch.no_grad():
        for key, entry in mapped.items():
            if key not in model_state:
                continue
            model_state[key].copy_(entry.read())
            done += entry.nbytes
            if progress is not None:
                progress(done, total)
    return result


def _summarize(label: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return f"{len(keys)} {label} key(s) ({shown})"
