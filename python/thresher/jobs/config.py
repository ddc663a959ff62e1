"""The base of every job's config: a dataclass that round-trips through JSON.

A job's config is the one description of a run: the CLI fills it from its flags, a user's
code builds it directly, and the job writes it beside its outputs (``config.json``) so a run
can be read back, compared and resumed. Fields hold JSON values only (str, int, float, bool,
None, lists/tuples and dicts of them); a path (``pathlib.Path``) given for a str field is
kept as its string.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path

__all__ = ["JobConfig", "JobError"]


class JobError(ValueError):
    """A job's input or output is not what the job can use (a missing or mismatched file, a
    folder that holds another run): the ``thresher`` command prints it as one line."""


def _declared(hint) -> tuple:
    """The runtime types a field's annotation names (``int | None`` -> (int, NoneType))."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(hint) for t in _declared(a))
    if origin is not None:
        return (origin,)
    if hint is None or hint is type(None):
        return (type(None),)
    return (hint,) if isinstance(hint, type) else (object,)  # typing.Any and the like


def _is_json(value) -> bool:
    """Whether ``value`` is a JSON value (dicts with str keys)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _coerce(cls_name: str, name: str, hint, value):
    declared = _declared(hint)
    if object in declared:
        return value
    if isinstance(value, os.PathLike) and str in declared:
        value = os.fspath(value)  # a pathlib.Path for a path field
    if isinstance(value, (list, tuple, dict)) and not _is_json(value):
        raise TypeError(f"{cls_name}.{name} must hold JSON values only (str, int, float, bool, None, "
                        f"lists, dicts with str keys), got {value!r}")
    if isinstance(value, dict):
        value = json.loads(json.dumps(value))  # the config's own copy, as its JSON reads back
    if isinstance(value, list) and tuple in declared and list not in declared:
        value = tuple(value)  # JSON has no tuples
    if type(value) is int and float in declared and int not in declared:
        value = float(value)  # a user may write lr=1 for a float field
    # a bool is an int to isinstance: accept it only where bool is declared
    if isinstance(value, declared) and (bool in declared or not isinstance(value, bool)):
        return value
    want = " or ".join(sorted("None" if t is type(None) else t.__name__ for t in declared))
    raise TypeError(f"{cls_name}.{name} must be {want}, got {type(value).__name__} {value!r}")


@dataclasses.dataclass
class JobConfig:
    """Base class of the job configs (``TrainConfig``, ``ScoreConfig``, ``SelectConfig``,
    ``DemoConfig``): ``to_dict``/``from_dict``, ``to_json``/``from_json``, ``replace``, and
    ``from_namespace`` for the CLI. Type checks run at construction; a job checks values."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(type(self).__name__, f.name, hints[f.name],
                                                     getattr(self, f.name)))

    # -- dicts -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The fields as JSON values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict):
        """The config ``to_dict`` wrote; an unknown key is an error that names it (a typo
        must not silently fall back to a default)."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict needs a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise JobError(f"{cls.__name__}: unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"the fields are {', '.join(sorted(names))}")
        return cls(**data)

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The config as JSON text; with ``path``, also written there atomically."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            from thresher.core.files import atomic_open

            with atomic_open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike):
        """A config from JSON text or from the path of a JSON file."""
        text = os.fspath(source)
        if isinstance(source, os.PathLike) or not text.lstrip().startswith(("{", "[")):
            text = Path(source).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JobError(f"{cls.__name__}.from_json: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    # -- the CLI ---------------------------------------------------------------------------
    @classmethod
    def from_namespace(cls, args: argparse.Namespace):
        """The config from parsed CLI flags: each field takes the flag of the same name
        (``--batch-size`` -> ``batch_size``); flags that are not fields are ignored."""
        values = vars(args)
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    @classmethod
    def defaults(cls) -> dict:
        """The fields that have defaults, with them (what the CLI sets as its flags' defaults,
        so that the command and the config cannot disagree)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    def _check_at_least(self, lo, *names: str) -> None:
        """For ``validate``: a JobError naming the flag unless each field in ``names`` is None
        or >= ``lo``."""
        for name in names:
            v = getattr(self, name)
            if v is not None and not v >= lo:  # (NaN fails too)
                raise JobError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")

    def replace(self, **changes):
        """A copy with ``changes`` (unknown names raise TypeError, as ``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)
