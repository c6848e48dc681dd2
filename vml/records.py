"""Results with a JSON form: what ``--json`` prints, the same way for every command.

A porcelain (or plumbing) result is a dataclass that also derives from
:class:`Record`; its ``to_json()`` is its fields, in order, as JSON values.
A class says where its JSON form differs from its fields (a key renamed, a
property added, a field left out) in three class attributes, so the CLI
never builds a document by hand.  Every document is listed, field by field,
in ``docs/JSON.md``; ``tests/cli/test_json_contract.py`` runs each command
and checks its output against that list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, ClassVar

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]


class Record:
    """Base of every result dataclass with a JSON form (see the module docstring)."""

    #: (field name, JSON key) where they differ
    json_names: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: properties that belong in the JSON form, after the fields
    json_extra: ClassVar[tuple[str, ...]] = ()
    #: fields left out (internal, or shown in another form)
    json_omit: ClassVar[tuple[str, ...]] = ()
    #: fields whose own JSON object is merged into this one instead of nested
    json_flatten: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, JsonValue]:
        """This result as a JSON object (``docs/JSON.md`` lists every key)."""
        out: dict[str, JsonValue] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name in self.json_omit or f.name.startswith("_"):
                continue
            value = to_json(getattr(self, f.name))
            if f.name in self.json_flatten and isinstance(value, dict):
                out.update(value)
            else:
                out[dict(self.json_names).get(f.name, f.name)] = value
        for name in self.json_extra:
            out[name] = to_json(getattr(self, name))
        return out


def to_json(value: Any) -> JsonValue:
    """``value`` as JSON: records and objects with ``to_json`` as objects, ids as hex."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "to_json"):
        return value.to_json()  # type: ignore[no-any-return]
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"no JSON form for {type(value).__name__}")
