"""Flat option names over sectioned frozen configs.

A config split into section records (``AggregatorConfig.limits``, ``MqttConfig.flow``...) is
still spelled flat by its users (command lines, config files, ``from_url(url, max_inflight=5)``):
every field of a section is an option of the same name. :func:`replace_flat` applies such
options to a config, each to the section that owns it, and :func:`flat_values` gives them back.
Option names are unique across a config's sections and its own fields. A section may have
sections of its own (its ``SECTIONS`` class variable), whose fields are flat options too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["flat_values", "owners", "replace_flat"]

_C = TypeVar("_C")


def _sections_of(record: object) -> Mapping[str, type[Any]]:
    """A record's own sections (its ``SECTIONS`` class variable; none without one)."""
    sections: Mapping[str, type[Any]] = getattr(record, "SECTIONS", {})
    return sections


def owners(sections: Mapping[str, type[Any]]) -> dict[str, str]:
    """Each section field's name -> the name of its section (the fields of a section's own
    sections count as that section's)."""
    out: dict[str, str] = {}
    for name, record in sections.items():
        inner = _sections_of(record)
        out.update({field: name for field in owners(inner)})
        out.update({f.name: name for f in dataclasses.fields(record) if f.name not in inner})
    return out


def section_changes(
    config: object, sections: Mapping[str, type[Any]], changes: Mapping[str, Any]
) -> dict[str, Any]:
    """The :func:`dataclasses.replace` arguments of ``config`` for ``changes``: a section's
    field replaces that section's field (on the section given in ``changes`` if there is one),
    any other name is passed on as it is."""
    owner = owners(sections)
    top: dict[str, Any] = {}
    by_section: dict[str, dict[str, Any]] = {}
    for name, value in changes.items():
        section = owner.get(name)
        if section is None:
            top[name] = value
        else:
            by_section.setdefault(section, {})[name] = value
    for section, values in by_section.items():
        current = top.get(section, getattr(config, section))
        top[section] = replace_flat(current, _sections_of(current), values)
    return top


def replace_flat(config: _C, sections: Mapping[str, type[Any]], changes: Mapping[str, Any]) -> _C:
    """A copy of the dataclass ``config`` with the flat ``changes`` applied (validated again);
    ``TypeError`` for a name that is neither a field nor a section's field."""
    return dataclasses.replace(config, **section_changes(config, sections, changes))  # type: ignore[type-var]


def flat_values(config: object, sections: Mapping[str, type[Any]]) -> dict[str, Any]:
    """Every field of ``config`` and of its sections (the sections themselves left out)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if f.name in sections:
            out.update(flat_values(value, _sections_of(value)))
        else:
            out[f.name] = value
    return out
