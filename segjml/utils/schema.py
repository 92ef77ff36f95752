"""Typed config nodes (dataclasses with Enums) checked in one place, with one-line messages.

A schema is a dataclass registered in Hydra's ConfigStore and named first in its group's defaults list, so Hydra
refuses a value of the wrong type, a choice that is not one of an Enum's members, or a key the schema does not have
while it composes the config. What a type cannot say (a weight >= 0, a number in [0, 1]) is a field's ``check``
(``field(metadata={"check": fn})``, ``fn(value, name)`` raising a one-line ``ValueError``), run by :func:`checked`
when the node is used. :func:`checked` also runs the whole schema on keyword arguments given from Python, so a class
built from a config and one built in Python are checked by the same rules. :func:`config_error` turns OmegaConf's
refusal (``ValidationError``, ``ConfigKeyError``) into one line that names the key and what it takes.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


def checks(check: Callable[[Any, str], None], default: Any) -> Any:
    """A dataclass field with ``default`` whose values must also pass ``check(value, name)``."""
    return dataclasses.field(default=default, metadata={"check": check})


def _field_type(schema: type, key: str) -> Any:
    """The annotation of ``schema.key`` without ``Optional``; ``None`` for an unknown key."""
    hint = typing.get_type_hints(schema).get(key)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and type(None) in typing.get_args(hint) and len(args) == 1 else hint


def _fields(schema: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema)}


def _check_values(schema: type, options: Mapping[str, Any], node: str) -> None:
    """Every field check of ``schema`` on the values ``options`` gives, nested schemas included."""
    for name, spec in _fields(schema).items():
        if name not in options:
            continue
        value, key = options[name], f"{node}.{name}"
        if "check" in spec.metadata:
            spec.metadata["check"](value, key)
        sub = _field_type(schema, name)
        if dataclasses.is_dataclass(sub) and isinstance(value, Mapping):
            _check_values(sub, value, key)


def checked(schema: type, options: Mapping[str, Any], node: str) -> dict[str, Any]:
    """``options`` (keyword arguments or a config node) checked against ``schema`` and completed with its defaults,
    as plain values (an Enum member as its name); ``node`` is where the options live in the config (``loss``).

    Raises:
        ValueError: one line naming ``<node>.<key>``: a value a field's check refuses, a value of the wrong type or
            not one of an Enum's members, or a key the schema does not have.
    """
    # config nodes as plain values: a typed node would be merged as it is, with keys added to it by `+key=...`
    options = {
        k: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
        for k, v in options.items()
    }
    _check_values(schema, options, node)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), options)
    except OmegaConfBaseException as err:
        raise ValueError(config_error(err, node)) from None
    return OmegaConf.to_container(typed, resolve=True, enum_to_str=True)


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def config_error(err: OmegaConfBaseException, node: str = "") -> str:
    """One line for OmegaConf's refusal of a value or a key of a typed node, naming the key and what it takes:
    ``loss.jml.variant=jml3 is not one of jml1, jml2, sjl_l1, sjl_l2`` or ``unknown key loss.bls.foo; loss.bls
    takes kernel_size, eps, strict_ignore``. ``node`` is prefixed to OmegaConf's key (empty when the key is already
    the full dotted key, as in a composed config)."""
    key = ".".join(k for k in (node, str(err.full_key or err.key or "")) if k)
    schema = err.object_type if dataclasses.is_dataclass(err.object_type) else None
    first = str(err.msg).strip().splitlines()[0] if str(err.msg).strip() else type(err).__name__
    if schema is None:
        return f"{key}: {first}" if key else first
    parent = key.rsplit(".", 1)[0] if "." in key else (node or "the config")
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        takes = [name for name in _fields(schema) if name != "_target_"]  # Hydra's, not an option
        return f"unknown key {key}; {parent} takes {', '.join(takes)}"
    spec, expected = _fields(schema).get(str(err.key)), _field_type(schema, str(err.key))
    value = err.value
    if spec is not None and "check" in spec.metadata:
        try:  # the field's own check words the refusal (the type's words are less precise than its rule)
            spec.metadata["check"](value, key)
        except ValueError as refusal:
            return str(refusal)
    if isinstance(expected, type) and issubclass(expected, Enum):
        hint = " ".join((expected.__dict__.get("__doc__") or "").split())  # an Enum's docstring: what they mean
        return f"{key}={value} is not one of {', '.join(m.name for m in expected)}" + (f" ({hint})" if hint else "")
    if expected in _KINDS:
        return f"{key}={value!r} must be {_KINDS[expected]}"
    if dataclasses.is_dataclass(expected):
        return f"{key}={value!r} must be null or a node of {', '.join(_fields(expected))}"
    return f"{key}={value!r}: {first}"
