"""The weights of a TorchScript archive, found without running it.

``torch.jit.load`` builds the module by running the archive's code (a scripted class's
``__setstate__`` is TorchScript that may read and write files or never end). Here the
archive's ``data.pkl`` is read by the restricted unpickler instead: every module is a
``ScriptObject`` whose state maps attribute names to values, and its parameters and buffers
are the tensor attributes its class declares in the archive's code
(``__parameters__ = ["weight", "bias", ]``, ``__buffers__ = [...]``), read as text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from nndiag.checkpoints.unpickler import ScriptObject

_DECLARED = re.compile(r"^[ \t]+__(?:parameters|buffers)__ = \[(.*)\]$", re.M)
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def is_module(value: Any) -> bool:
    """A scripted ``nn.Module`` (its state holds ``training``), not another scripted class."""
    return isinstance(value, ScriptObject) and isinstance(value.state, dict) and \
        "training" in value.state


def code_record(qualified_name: str) -> str:
    """The code record that defines a class (``__torch__.a.b.C`` -> ``code/__torch__/a/b.py``)."""
    return "code/" + "/".join(qualified_name.split(".")[:-1]) + ".py"


def declared_tensors(code: str, class_name: str) -> set[str] | None:
    """The parameters and buffers a module class declares in its code (``None``: not found)."""
    match = re.search(rf"^class {re.escape(class_name)}\(Module\):\n((?:[ \t].*\n?|\n)*)",
                      code, re.M)
    if match is None:
        return None
    names: set[str] = set()
    for listing in _DECLARED.finditer(match.group(1)):
        names.update(_QUOTED.findall(listing.group(1)))
    return names


def module_tensors(root: ScriptObject,
                   declared: Callable[[str], set[str] | None]) -> dict[str, torch.Tensor]:
    """The state dict of a scripted module: its parameters and buffers, then its submodules'.

    Args:
        root: The unpickled top module.
        declared: The parameters and buffers of a class, by qualified name (``None`` when its
            code does not say: every tensor attribute is taken).
    """
    weights: dict[str, torch.Tensor] = {}
    visited: set[int] = set()
    pending: list[tuple[str, ScriptObject]] = [("", root)]
    while pending:
        prefix, module = pending.pop()
        if id(module) in visited:
            continue
        visited.add(id(module))
        names = declared(type(module).qualified_name)
        children = []
        for attribute, value in module.state.items():
            if not isinstance(attribute, str):
                continue
            if isinstance(value, torch.Tensor) and (names is None or attribute in names):
                weights[prefix + attribute] = value
            elif is_module(value):
                children.append((f"{prefix}{attribute}.", value))
        pending.extend(reversed(children))
    return weights
