"""JSON rendering of reports.

JSON has no NaN or Infinity: non-finite numbers are written as the strings ``"nan"``,
``"inf"`` and ``"-inf"`` so that a NaN diagnosis survives the trip (docs/reference/json.md).
"""

from __future__ import annotations

import json
import math
from typing import Any

from nndiag.findings import Report


def jsonable(value: Any) -> Any:
    """Replace non-finite floats (recursively) by their string names."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def render_json(report: Report, indent: int | None = 2) -> str:
    """The report as a JSON document (strict: no NaN or Infinity literals)."""
    return json.dumps(jsonable(report.to_dict()), indent=indent, allow_nan=False)
