"""The generic machinery under `zray.config`: field specs, value coercion, dict -> dataclass.

Each config section is a frozen dataclass deriving from `Section`. Its fields carry their
constraints in `dataclasses.field(metadata=meta(...))`, and `Section.__post_init__`
coerces and checks every field from its type hint. Checking in `__post_init__` rather than in the
JSON reader means a section built in Python (`ZeroConfig(stage=5)`) or through
`dataclasses.replace` is held to exactly the same rules as one read from a file.

`build` turns a JSON-style dict into a section: it maps deprecated spellings, warns about the
DeepSpeed keys zray ignores (`IGNORED_KEYS`, the one list of them), and rejects unknown keys with
a did-you-mean suggestion.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar, Union

from zray.config.ignored import DECIDED_KEYS, IGNORED_KEYS
from zray.errors import NOT_GIVEN, ConfigError, ZrayConfigWarning

# Hugging Face's Trainer writes "auto" wherever it fills a value in itself; zray reads it as
# "use the default / derive it".
AUTO = "auto"

# Keys already warned about in this process. Module-level on purpose: a config is parsed on the
# driver and again on every worker and at every restart; one warning per key per process is
# what a reader can act on.
_WARNED_KEYS: set[str] = set()

S = TypeVar("S", bound="Section")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


# Depth of `rereading()` blocks: a config read again (not the user's text) warns about nothing.
_REREADING = 0


@contextlib.contextmanager
def rereading() -> Iterator[None]:
    """Read a config that was already read and reported on elsewhere: `warn_once` stays silent
    and remembers nothing (a later read of the user's own text still warns)."""
    global _REREADING
    _REREADING += 1
    try:
        yield
    finally:
        _REREADING -= 1


# Warnings of the config being read, held until it is known to be valid (None: not holding).
_HELD: list[tuple[str, str]] | None = None


@contextlib.contextmanager
def held_warnings() -> Iterator[None]:
    """Hold `warn_once` warnings while a config is read and give them only if it reads without
    error: a refused config gets its one error line, not warnings about keys it will never use
    first. Nested blocks hold into the outermost."""
    global _HELD
    if _HELD is not None:
        yield
        return
    _HELD = []
    try:
        yield
        held = _HELD
    finally:
        _HELD = None
    for key, message in held:
        warn_once(key, message)


def warn_once(key: str, message: str) -> None:
    """Warn `key: message` with ZrayConfigWarning, at most once per key per process."""
    if key in _WARNED_KEYS or _REREADING:
        return
    if _HELD is not None:
        if (key, message) not in _HELD:
            _HELD.append((key, message))
        return
    _WARNED_KEYS.add(key)
    warnings.warn(f"{key}: {message}", ZrayConfigWarning, stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    """Stack level of the first frame outside the zray package, so the warning points at the
    user's call (Config.load, zray.fit) rather than at the parser's recursion depth."""
    frame, level = sys._getframe(1), 1
    # contextlib's frames too: held warnings are given from `held_warnings`' exit.
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR)
        or frame.f_code.co_filename == contextlib.__file__
    ):
        frame, level = frame.f_back, level + 1
    return level


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def meta(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    ignore_case: bool = False,
    aliases: tuple[str, ...] = (),
    key: str | None = None,
    auto: Any = NOT_GIVEN,
) -> dict[str, Any]:
    """Field metadata holding the constraints `Section` checks, used as
    `field(default=0, metadata=meta(ge=0))`.

    `aliases` are deprecated spellings read as this field (with a warning); `key` overrides the
    dotted path used in messages when the field does not sit at `<section path>.<name>`; `auto`
    is what "auto" reads as when that is not the default (e.g. None: "derived later").
    Bounds apply to each element of a list value.
    """
    return {
        "ge": ge,
        "gt": gt,
        "le": le,
        "lt": lt,
        "choices": choices,
        "ignore_case": ignore_case,
        "aliases": aliases,
        "key": key,
        "auto": auto,
    }


def is_off(value: object) -> bool:
    """Whether an ignored key's value leaves the feature off, so ignoring it changes nothing."""
    if isinstance(value, Mapping):
        return value.get("enabled") is False or not value
    return value is None or value is False or value == AUTO or value == 0 or value == ""


def describe(tp: Any) -> str:
    """What a type hint accepts, in the words of an error message."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        # "an integer" -> "integers", "a number" -> "numbers"
        item = describe(args[0]).removeprefix("an ").removeprefix("a ") + "s"
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {item}"
        return f"a list of {len(args)} {item}"
    if tp is dict or typing.get_origin(tp) is dict:
        return "an object"
    if isinstance(tp, type) and issubclass(tp, Section):
        return f"an object with keys {', '.join(tp.json_keys())}"
    return str(tp)


def _matches(value: object, tp: Any) -> bool:
    """Whether `value` is the kind of JSON value that union member `tp` reads."""
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if typing.get_origin(tp) is tuple:
        return isinstance(value, list | tuple)
    if tp is dict or typing.get_origin(tp) is dict:
        return isinstance(value, Mapping)
    if isinstance(tp, type) and issubclass(tp, Section):
        return isinstance(value, tp | Mapping)
    return False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a JSON value to type hint `tp`, or raise ConfigError naming `key`.

    Idempotent: an already-converted value comes back unchanged, which is what lets
    `Section.__post_init__` run on values from JSON and from Python alike.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None) and _matches(value, option):
                return coerce(value, option, key)
        raise ConfigError(key, value, describe(tp))
    if tp is Any:
        return value
    if not _matches(value, tp):
        raise ConfigError(key, value, describe(tp))
    if tp is int:
        # DeepSpeed configs write sizes as 5e8; JSON reads that as a float.
        if isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                raise ConfigError(key, value, "an integer")
            return int(value)
        return value
    if tp is float:
        if not math.isfinite(value):
            raise ConfigError(key, value, "a finite number")
        return float(value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise ConfigError(key, value, describe(tp))
        return tuple(
            coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if tp is dict or origin is dict:
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(key, value, "an object with string keys")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Section) and not isinstance(value, tp):
        return build(tp, value)
    return value


def check_choice(value: Any, choices: tuple[Any, ...], key: str, ignore_case: bool = False) -> Any:
    """Return `value` as spelled in `choices` (case-folded if asked) or raise naming the choices."""
    allowed = "one of " + ", ".join(str(c) for c in choices)
    if value in choices:
        return value
    if ignore_case and isinstance(value, str):
        folded = {str(c).lower(): c for c in choices}
        if value.lower() in folded:
            return folded[value.lower()]
    reason = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(c) for c in choices], n=1, cutoff=0.6)
        if close:
            reason = f"unknown value (did you mean {close[0]!r}?)"
    raise ConfigError(key, value, allowed, reason)


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def bounds_text(meta: Mapping[str, Any]) -> str:
    """' >= 0 and <= 1' for the bounds in `meta`, '' when there are none."""
    parts = [f"{op} {meta[k]}" for k, op in _BOUNDS.items() if meta.get(k) is not None]
    return " " + " and ".join(parts) if parts else ""


def check_bounds(value: Any, meta: Mapping[str, Any], key: str, what: str) -> None:
    """Raise if the number `value` breaks the ge/gt/le/lt bounds in `meta`."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    tests = {
        "ge": lambda b: value >= b,
        "gt": lambda b: value > b,
        "le": lambda b: value <= b,
        "lt": lambda b: value < b,
    }
    if any(meta.get(k) is not None and not test(meta[k]) for k, test in tests.items()):
        raise ConfigError(key, value, what + bounds_text(meta))


def check_keys(
    raw: Mapping[str, Any], path: str, known: Iterable[str], extra: Iterable[str] = ()
) -> dict[str, Any]:
    """Drop (and warn about) ignored keys of section `path`; raise on unknown ones.

    `known` are the keys the section reads; `extra` are further spellings it accepts (deprecated
    aliases) that typo suggestions may point to but the allowed list does not advertise.
    """
    known = list(known)
    accepted = set(known) | set(extra)
    prefix = f"{path}." if path else ""
    ignored_here = [k[len(prefix) :] for k in IGNORED_KEYS if k.startswith(prefix)]
    ignored_here = [k for k in ignored_here if "." not in k]
    kept: dict[str, Any] = {}
    for k, v in raw.items():
        full = join(path, str(k))
        if k in accepted:
            kept[k] = v
        elif full in IGNORED_KEYS:
            if not is_off(v):
                warn_once(full, f"ignored by zray ({IGNORED_KEYS[full]})")
        else:
            candidates = [*accepted, *ignored_here]
            close = difflib.get_close_matches(str(k), candidates, n=1, cutoff=0.6)
            reason = f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"
            raise ConfigError(full, v, "the keys " + ", ".join(known), reason)
    return kept


def build(cls: type[S], raw: Any) -> S:
    """Build section `cls` from a JSON-style mapping (keys as DeepSpeed users write them)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(cls._path or "config", raw, describe(cls))
    raw = cls._prepare(dict(raw))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {a: f.name for f in fields.values() for a in f.metadata.get("aliases", ())}
    kwargs = check_keys(raw, cls._path, fields, aliases)
    for alias, name in aliases.items():
        if alias not in kwargs:
            continue
        if name in kwargs:
            raise ConfigError(
                join(cls._path, alias),
                kwargs[alias],
                f"only one of {alias} and {name}",
                f"{join(cls._path, alias)} is a deprecated spelling of {join(cls._path, name)}",
            )
        warn_once(join(cls._path, alias), f"deprecated spelling; write {join(cls._path, name)}")
        kwargs[name] = kwargs.pop(alias)
    _warn_decided(cls, kwargs)
    for f in fields.values():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            key = f.metadata.get("key") or join(cls._path, f.name)
            raise ConfigError(key, NOT_GIVEN, cls._allowed(f.name), cls._missing(f.name))
    return cls(**kwargs)


def _warn_decided(cls: type[Section], given: Mapping[str, Any]) -> None:
    """Warn once about each key zray decides itself (DECIDED_KEYS) that is set to something
    other than DeepSpeed's default: the setting changes nothing in zray."""
    for name, value in given.items():
        key = join(cls._path, name)
        if key not in DECIDED_KEYS or (isinstance(value, str) and value == AUTO):
            continue
        default = cls._deepspeed_default(name, given)
        if value is None or (default is not dataclasses.MISSING and value == default):
            continue
        warn_once(key, f"accepted, but zray decides this itself: {DECIDED_KEYS[key]}")


_HINTS: dict[type, dict[str, Any]] = {}


def hints_of(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def plain(value: Any) -> Any:
    """A JSON-ready copy of a section value (tuples become lists)."""
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


class Section:
    """Base of the config dataclasses: checks every field in `__post_init__`.

    Subclasses are `@dataclass(frozen=True)`; they set `_path` (their dotted place in the
    DeepSpeed JSON, used in messages) and may override `_prepare` (rewrite legacy spellings
    before reading) and `_check` (rules across fields, after each field is valid).
    """

    _path: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = hints_of(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key = f.metadata.get("key") or join(self._path, f.name)
            value = getattr(self, f.name)
            if isinstance(value, str) and value == AUTO:
                value = self._auto_value(f, key)
            try:
                value = coerce(value, hints[f.name], key)
            except ConfigError as e:
                if e.key != key:  # an error deeper down already names its own key
                    raise
                raise ConfigError(key, e.value, self._allowed(f.name), e.reason) from None
            if f.metadata.get("choices") is not None and value is not None:
                ignore_case = f.metadata.get("ignore_case", False)
                value = check_choice(value, f.metadata["choices"], key, ignore_case)
            items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
            for i, v in items:
                what = "an integer" if type(v) is int else "a number"
                check_bounds(v, f.metadata, key if i is None else f"{key}[{i}]", what)
            # Frozen dataclass: __post_init__ is the one place allowed to normalise in place.
            object.__setattr__(self, f.name, value)
        self._check()

    @staticmethod
    def _auto_value(f: dataclasses.Field[Any], key: str) -> Any:
        if f.metadata.get("auto", NOT_GIVEN) is not NOT_GIVEN:
            return f.metadata["auto"]
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        raise ConfigError(key, AUTO, "an explicit value", "required key has no default for 'auto'")

    @classmethod
    def _prepare(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Rewrite legacy spellings in a raw dict before it is read; default: unchanged."""
        return raw

    def _check(self) -> None:
        """Rules across fields; runs after every field is coerced and in range."""

    @classmethod
    def _deepspeed_default(cls, name: str, given: Mapping[str, Any]) -> Any:
        """What DeepSpeed uses for field `name` when it is not written (the other keys given
        are `given`); the field's default unless a section says otherwise."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[arg-type]
        return f.default

    @classmethod
    def _missing(cls, name: str) -> str:
        """Why required field `name` is an error when left out."""
        return "required key is missing"

    @classmethod
    def json_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def _allowed(cls, name: str) -> str:
        """What field `name` accepts, bounds included, in the words of an error message."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[arg-type]
        if f.metadata.get("choices") is not None:
            return "one of " + ", ".join(str(c) for c in f.metadata["choices"])
        return describe(hints_of(cls)[name]) + bounds_text(f.metadata)

    def to_dict(self) -> dict[str, Any]:
        """The section as JSON-ready DeepSpeed-style keys; `build` reads it back equal."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
