"""Typed, validated access to params.yaml.

Stages read their section through :class:`Params`, which fails at once with a message naming the dotted key
(``softmax.epochs: expected an integer >= 1, got 'ten'``) instead of failing deep inside training.
Values are never evaluated, only type-checked.

A section's keys are declared once, as a :class:`Contract`: a frozen dataclass whose fields are the keys, each
made with :func:`setting` (default, one-line help, bounds or choices). ``Contract.read(params)`` reads and
checks every key through the getters below, so the errors are theirs (voiceprint/core/contracts.py holds the stages'
contracts).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import yaml

from voiceprint.core.errors import VoiceprintError


class ParamsError(VoiceprintError, ValueError):
    """A params.yaml value is missing, of the wrong type, or out of range. The message names the key."""


def load_params(path: str | Path = "params.yaml") -> "Params":
    """The params file, checked against the dvc.yaml beside it (when there is one): every key must be a param
    some stage declares, so a misspelt key fails naming the closest instead of being silently ignored."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ParamsError(f"{path}: not valid YAML: {where}{problem or ' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    _check_moved_keys(path, data)
    _check_known_keys(path, data)
    return Params(data, source=str(path))


# Keys that moved to another section (every key belongs to the one stage that reads it): a file, preset or
# `dvc exp run -S` still setting the old key is told where it went, with or without a dvc.yaml beside it.
MOVED_KEYS = {"tdnn.fusion": "evaluate.fusion", "tdnn.fusion_weight": "evaluate.fusion_weight"}


def _check_moved_keys(path: Path, data: dict) -> None:
    for old, new in MOVED_KEYS.items():
        section, _, key = old.partition(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            raise ParamsError(f"{path}: {old}: moved to {new}; set {new} instead")


def _check_known_keys(path: Path, data: dict) -> None:
    try:
        stages = yaml.safe_load((path.parent / "dvc.yaml").read_text())["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return      # no pipeline beside this file (a preset, a test's scratch copy): nothing to check against
    declared = {p for stage in stages.values() for p in stage.get("params", []) if isinstance(p, str)}
    for section, values in data.items():
        keys = [f"{section}.{k}" for k in values] if isinstance(values, dict) else [str(section)]
        for key in keys:
            if key not in declared and key.partition(".")[0] not in declared:
                close = difflib.get_close_matches(key, sorted(declared), n=1)
                raise ParamsError(f"{path}: {key}: unknown key (no stage in dvc.yaml reads it)"
                                  + (f"; did you mean {close[0]}?" if close else ""))


class Params:
    """A read-only view of one params mapping; every getter validates and names the dotted key on error."""

    def __init__(self, data: dict, prefix: str = "", source: str = "params.yaml", reads: set | None = None):
        self._data = data
        self._prefix = prefix
        self._source = source
        self._reads = reads     # when a set: every dotted key read is added to it (tests: declared = read)

    def _key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def _fail(self, name: str, why: str) -> ParamsError:
        return ParamsError(f"{self._source}: {self._key(name)}: {why}")

    def error(self, name: str, why: str) -> ParamsError:
        """A ParamsError naming this key, for checks across keys made by the caller (raise it)."""
        return self._fail(name, why)

    def section(self, name: str) -> "Params":
        if name not in self._data:
            raise self._fail(name, "missing")
        value = self._data[name]
        if not isinstance(value, dict):
            raise self._fail(name, f"expected a section (mapping), got {value!r}")
        return Params(value, prefix=self._key(name) + ".", source=self._source, reads=self._reads)

    def _get(self, name: str, default: Any = ...) -> Any:
        if self._reads is not None:
            self._reads.add(self._key(name))
        if name not in self._data:
            if default is ...:
                raise self._fail(name, "missing")
            return default
        return self._data[name]

    def int(self, name: str, *, min: int | None = None, max: int | None = None, default: Any = ...) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(name, f"expected an integer, got {value!r}")
        self._check_range(name, value, min, max)
        return value

    def float(self, name: str, *, min: float | None = None, max: float | None = None,
              min_exclusive: bool = False, default: Any = ...) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(name, f"expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):     # NaN compares false with any bound, so it would pass them all
            raise self._fail(name, f"expected a finite number, got {value}")
        if min_exclusive and min is not None and value <= min:
            raise self._fail(name, f"must be > {min}, got {value}")
        self._check_range(name, value, None if min_exclusive else min, max)
        return value

    def bool(self, name: str, default: Any = ...) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise self._fail(name, f"expected true or false, got {value!r}")
        return value

    def str(self, name: str, *, choices: Sequence[str] | None = None, default: Any = ...) -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            raise self._fail(name, f"expected a string, got {value!r}")
        if choices is not None and value not in choices:
            raise self._fail(name, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def int_list(self, name: str, *, min_len: int = 1, min: int | None = None) -> list[int]:
        value = self._get(name)
        if not isinstance(value, list) or len(value) < min_len or any(
                isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise self._fail(name, f"expected a list of at least {min_len} integers, got {value!r}")
        for v in value:
            self._check_range(name, v, min, None)
        return list(value)

    def int_lists(self, name: str, *, check=None) -> list[list[int]]:
        """A non-empty list of non-empty integer lists (e.g. TDNN contexts); ``check(item)`` may raise ValueError,
        reported under this key."""
        value = self._get(name)
        if not isinstance(value, list) or not value or any(
                not isinstance(item, list) or not item or any(isinstance(v, bool) or not isinstance(v, int)
                                                              for v in item) for item in value):
            raise self._fail(name, f"expected a list of integer lists, e.g. [[-1, 0, 1], [0]], got {value!r}")
        for item in value:
            try:
                check and check(item)
            except ValueError as exc:
                raise self._fail(name, str(exc)) from None
        return [list(item) for item in value]

    def str_list(self, name: str, *, choices: Sequence[str] | None = None) -> list[str]:
        value = self._get(name)
        if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
            raise self._fail(name, f"expected a list of strings, got {value!r}")
        if choices is not None:
            bad = [v for v in value if v not in choices]
            if bad:
                raise self._fail(name, f"unknown value(s) {bad}; valid: {', '.join(choices)}")
        return list(value)

    def mapping(self, name: str) -> dict:
        """A mapping of names to values (e.g. a loss's own settings), passed through as it is."""
        value = self._get(name)
        if value is None:
            return {}
        if not isinstance(value, dict) or any(not isinstance(k, str) for k in value):
            raise self._fail(name, f"expected a mapping of names to values, e.g. {{gamma: 2.0}}, got {value!r}")
        return dict(value)

    def range(self, name: str, *, integer: bool = False, min: float | None = None,
              max: float | None = None) -> tuple:
        """A ``[low, high]`` pair with low <= high (a single number means low == high), e.g. an SNR range."""
        value = self._get(name)
        pair = value if isinstance(value, list) else [value]
        pair = pair * 2 if len(pair) == 1 else pair
        kinds = (int,) if integer else (int, float)
        if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, kinds) for v in pair):
            raise self._fail(name, f"expected [low, high] ({'integers' if integer else 'numbers'}), got {value!r}")
        for v in pair:
            self._check_range(name, v, min, max)
        if pair[0] > pair[1]:
            raise self._fail(name, f"low must be <= high, got {value!r}")
        return tuple(pair) if integer else (float(pair[0]), float(pair[1]))

    def _check_range(self, name, value, lo, hi) -> None:
        if lo is not None and value < lo:
            raise self._fail(name, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise self._fail(name, f"must be <= {hi}, got {value}")


def setting(default: Any, help: str, *, min: float | None = None, max: float | None = None,
            min_exclusive: bool = False, choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
            min_len: int = 1, check: Callable | None = None) -> Any:
    """A :class:`Contract` field: the key's default, its one-line help and the checks its getter applies.
    ``choices`` may be a function returning them (a registry read when the contract is read, so a loss or head
    registered later is a valid choice); ``check(item)`` may raise ValueError for an item of a list of lists."""
    factory = (lambda: dict(default)) if isinstance(default, dict) else None
    metadata = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive, "choices": choices,
                "min_len": min_len, "check": check}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _read_value(section: Params, name: str, kind, spec: dict):
    lo, hi = spec["min"], spec["max"]
    choices = spec["choices"]() if callable(spec["choices"]) else spec["choices"]
    if kind is bool:
        return section.bool(name)
    if kind is int:
        return section.int(name, min=lo, max=hi)
    if kind is float:
        return section.float(name, min=lo, max=hi, min_exclusive=spec["min_exclusive"])
    if kind is str:
        return section.str(name, choices=choices)
    if kind == tuple[int, ...]:
        return tuple(section.int_list(name, min_len=spec["min_len"], min=lo))
    if kind == tuple[str, ...]:
        return tuple(section.str_list(name, choices=choices))
    if kind == tuple[tuple[int, ...], ...]:
        return tuple(tuple(item) for item in section.int_lists(name, check=spec["check"]))
    if kind == tuple[float, float]:
        return section.range(name, min=lo, max=hi)
    if kind == tuple[int, int]:
        return section.range(name, integer=True, min=lo, max=hi)
    if kind == dict[str, Any]:
        return section.mapping(name)
    raise TypeError(f"contract key {name}: no getter for type {kind}")


class Contract:
    """Base of a section's contract: subclass as a frozen dataclass with ``section = "name"`` and fields made
    by :func:`setting`. Field names are the keys of the section; a contract may read part of a section (the
    ``augment`` section holds two)."""
    section: ClassVar[str]

    @classmethod
    def keys(cls) -> list[str]:
        """The dotted params keys this contract reads, as dvc.yaml lists them."""
        return [f"{cls.section}.{f.name}" for f in dataclasses.fields(cls)]

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f"{cls.section}.{f.name}": f.metadata["help"] for f in dataclasses.fields(cls)}

    @classmethod
    def read(cls, params: Params):
        """This contract's section of ``params`` (a whole params file), every key checked."""
        return cls.from_section(params.section(cls.section))

    @classmethod
    def from_section(cls, section: Params):
        hints = typing.get_type_hints(cls)
        values = {f.name: _read_value(section, f.name, hints[f.name], f.metadata)
                  for f in dataclasses.fields(cls)}
        return cls(**values).validate(section)

    def validate(self, section: Params) -> "Contract":
        """Checks across keys (``raise section.error(key, why)``), after the types and bounds; returns the
        settings (or a normalised copy, e.g. without duplicates)."""
        return self


def preset_assignments(preset: str | Path, base: str | Path = "params.yaml") -> list[str]:
    """A preset file (a partial params.yaml) as ``section.key=value`` assignments for ``dvc exp run -S``.

    Every key must exist in ``base``: a typo in a preset fails here, naming the key, instead of silently adding
    a parameter nothing reads."""
    known = load_params(base)._data
    overrides = load_params(preset)._data
    out = []
    for section, values in overrides.items():
        if section not in known or not isinstance(values, dict):
            raise ParamsError(f"{preset}: {section}: not a section of {base}")
        for key, value in values.items():
            if key not in known[section]:
                raise ParamsError(f"{preset}: {section}.{key}: not a key of {base}")
            text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
            text = text.removesuffix("\n...").removesuffix("...").strip()
            out.append(f"{section}.{key}={text}")
    return out


if __name__ == "__main__":   # python -m voiceprint.core.params PRESET.yaml -> -S flags for dvc exp run
    import shlex
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m voiceprint.core.params PRESET.yaml   (prints -S flags for dvc exp run)")
    try:
        print(" ".join(f"-S {shlex.quote(a)}" for a in preset_assignments(sys.argv[1])))
    except ParamsError as exc:
        sys.exit(f"error: {exc}")
