"""Report rows: typed records that also read like their JSON objects.

A report's ``layers`` hold the records themselves (``LayerRecord`` for a live inspection,
``ModuleWeights`` for a checkpoint's), so renderers use typed attributes. ``row["name"]`` and
``row.get("std")`` read the same fields under their JSON keys, as code written against the JSON
contract does.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar


class Row:
    """Mixin for a dataclass that is one row of a report's ``layers``.

    Attributes:
        json_properties: Properties written to the JSON object beside the fields.
    """

    json_properties: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """The row as its JSON object: every field, then ``json_properties``."""
        data = asdict(self)  # type: ignore[call-overload]
        for name in self.json_properties:
            data[name] = getattr(self, name)
        return data

    def _keys(self) -> tuple[str, ...]:
        return (*self.__dataclass_fields__, *self.json_properties)  # type: ignore[attr-defined]

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """The JSON key's value, or ``default`` when the row has no such key."""
        return getattr(self, key) if key in self._keys() else default
