"""Options defined once: a dataclass field's metadata (help, flag, valid range) builds the command line
and validates the value, so the CLI and library callers are held to the same rules.

Declare a field with :func:`option`; :func:`add_options` turns a dataclass's fields into argparse
arguments whose ``type`` parses and checks the text (bad values become argparse's one-line error);
:func:`check_fields` applies the same checks to an instance built in code, naming the field. Every
message echoes user input through :func:`shown`, so a huge bad value never prints megabytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from pathlib import Path

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import name_max

MAX_SEED = 2**32 - 1  # what every generator we seed (torch, numpy, random) accepts
MAX_TEXT_CHARS = 1_000_000  # a longer message or prompt is refused rather than tokenised
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux; the limit of every other short string (a name, a pattern) too
MAX_LIST = 1024  # entries in a comma-separated list
# Upper bounds that keep a typo from allocating the machine away; each is far beyond any real use here.
MAX_LAYERS = 1024  # blocks; also bounds a config.json's pattern before it is validated
MAX_WIDTH = 2**17
MAX_MODEL_VOCAB = 2**24  # rows of a model's embedding (an imported model's may exceed a prepared vocabulary's 2**16)
MAX_CONTEXT = 2**20
MAX_TOKENS = 2**40
MAX_REPEATS = 10_000
# Precisions by the names commands take (bench --dtypes, import --dtype), torch-free so the CLI's choices need
# no torch; runtime.DTYPES maps each to its torch.dtype.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
SHOWN_CHARS = 80  # user input echoed in a message is cut to this
MAX_MESSAGE_CHARS = 600  # and a whole error line to this

# Kinds of value; the field's type gives the kind unless ``kind`` says otherwise.
# "output": a file or a directory, which the command's other options decide (export --format).
KINDS = ("int", "float", "bool", "str", "text", "seed", "ints", "seeds", "strs", "input", "outdir", "outfile",
         "output")
PATHS = ("input", "outdir", "outfile", "output")  # kinds naming a path: NULs refused, links and types checked
LISTS = {"ints": "int", "seeds": "seed", "strs": "str"}  # comma-separated, and the kind of each entry

METAVARS = {"int": "N", "seed": "N", "float": "X", "ints": "N,N,...", "seeds": "N,N,...", "strs": "A,B,...",
            "text": "TEXT", "str": "TEXT", "input": "PATH", "outdir": "DIR", "outfile": "FILE",
            "output": "PATH"}


def pattern_problem(text: str) -> str | None:
    """A layer pattern's length over MAX_LAYERS, checked before the pattern is parsed (the letters are the
    model's to check)."""
    return None if len(text) <= MAX_LAYERS else f"has {len(text):,} letters; the limit is {MAX_LAYERS:,}"


def shown(value) -> str:
    """``repr(value)``, cut to SHOWN_CHARS with the full length noted."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= SHOWN_CHARS:
        return repr(text) if isinstance(value, str) else text
    cut = text[:SHOWN_CHARS]
    return f"{cut!r}... ({len(text):,} characters)" if isinstance(value, str) else f"{cut}... ({len(text):,} digits)"


def one_line(message: str) -> str:
    """An error message as one bounded line: no line breaks, long words and the whole line cut."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates printable
    message = re.sub(r"[\r\n\t\x00-\x1f\x7f]+", " ", message)
    message = re.sub(r"\S{%d,}" % (SHOWN_CHARS * 2 + 1), lambda m: m.group()[:SHOWN_CHARS * 2] + "...", message)
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 3] + "..."


@dataclass(frozen=True)
class Spec:
    """How one option is spelled, parsed and checked."""

    help: str | None = None
    kind: str | None = None  # one of KINDS; default from the field's type
    lo: float | None = None  # smallest valid value (numbers; for lists, of each entry)
    hi: float | None = None  # largest valid value
    lo_open: bool = False  # lo itself is not valid (a positive learning rate)
    hi_open: bool = False  # hi itself is not valid (dropout below 1)
    flags: tuple[str, ...] = ()  # spellings; default --field-name
    choices: tuple | None = None
    metavar: str | None = None
    allow_empty: bool = False  # "" is a meaningful value (not "use the default")
    unique: bool = False  # list entries must differ
    check: Callable | None = None  # extra rule: value -> problem text, or None
    positional: bool = False  # an argument without a flag
    nargs: str | None = None  # argparse's nargs ("+", "*")
    required: bool | None = None  # a flag that must be given
    cli: bool = True  # False: a library setting without a flag
    hidden: bool = False  # a flag for tests, left out of --help
    show_default: bool = True  # append "(default: ...)" to the help


def option(default=MISSING, *, default_factory=MISSING, **spec) -> dataclasses.Field:
    """A dataclass field carrying its :class:`Spec`."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"spec": Spec(**spec)})


def spec_of(f: dataclasses.Field) -> Spec:
    return f.metadata.get("spec", Spec())


def _kind(f: dataclasses.Field, hint) -> str:
    spec = spec_of(f)
    if spec.kind:
        return spec.kind
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return {int: "ints", str: "strs"}[typing.get_args(hint)[0]]
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(hint, "str")


def kinds(cls) -> dict[str, str]:
    hints = typing.get_type_hints(cls)
    return {f.name: _kind(f, hints[f.name]) for f in dataclasses.fields(cls)}


def _range_problem(value: float, spec: Spec, kind: str) -> str | None:
    lo, hi = (0, MAX_SEED) if kind == "seed" else (spec.lo, spec.hi)
    if kind == "float" and not math.isfinite(value):
        return "must be a finite number"
    low = lo is not None and (value <= lo if spec.lo_open else value < lo)
    high = hi is not None and (value >= hi if spec.hi_open else value > hi)
    if not (low or high):
        return None
    fmt = (lambda v: f"{v:g}") if kind == "float" else (lambda v: f"{int(v)}")
    if lo is not None and hi is not None and kind in ("float", "seed"):  # a fraction, a seed: the interval
        return f"must be in {'(' if spec.lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if spec.hi_open else ']'}"
    if low:
        if spec.lo_open:
            return "must be a positive number" if lo == 0 else f"must be greater than {fmt(lo)}"
        return "must not be negative" if lo == 0 else f"must be at least {fmt(lo)}"
    return f"must be below {fmt(hi)}" if spec.hi_open else f"must be at most {fmt(hi)}"


def _text_problem(text: str, kind: str, spec: Spec) -> str | None:
    if any("\ud800" <= ch <= "\udfff" for ch in text):  # undecodable bytes arrive as lone surrogates
        return "is not valid UTF-8 text"
    if not text.strip() and not spec.allow_empty:
        return "must not be empty"
    limit = MAX_TEXT_CHARS if kind == "text" else MAX_PATH_CHARS
    if len(text) > limit:
        return f"is {len(text):,} characters long; the limit is {limit:,}"
    if kind in PATHS and "\x00" in text:
        return "contains a NUL character"
    return None


def _path_problem(path: Path, kind: str) -> str | None:
    """An existing path of the wrong type, or an output name longer than its file system takes, caught
    before any work starts."""
    if kind in ("outdir", "outfile", "output"):
        size, limit = len(os.fsencode(path.name)), name_max(path.parent)
        if size > limit:
            return f"has a name of {size:,} bytes; its file system takes names of at most {limit:,} bytes"
    try:
        try:
            path.resolve()
        except RuntimeError:  # what pathlib raises for a loop of symbolic links, where the caller resolves it
            return "is or passes through a loop of symbolic links"
        if kind in ("input", "output") and path.exists() and not (path.is_file() or path.is_dir()):
            return "is not a regular file or a directory"
        if kind == "input":
            return None
        if path.exists():
            if kind == "outdir" and not path.is_dir():
                return "exists and is not a directory"
            if kind == "outfile" and not path.is_file():
                return "exists and is not a regular file"
        for parent in path.absolute().parents:
            if parent.exists():
                return None if parent.is_dir() else f"cannot be created: {parent} is not a directory"
    except OSError as e:  # a name too long for the file system, a permission error on a parent
        return f"cannot be used: {e.strerror or e}"
    return None


def check_value(value, kind: str, spec: Spec = Spec()):
    """The problem with a parsed ``value`` of ``kind`` (text), or None."""
    if value is None:
        return None
    if kind in ("int", "seed", "float"):
        if isinstance(value, bool) or not isinstance(value, int if kind != "float" else (int, float)):
            return "must be a whole number" if kind != "float" else "must be a number"
        problem = _range_problem(value, spec, kind)
        return problem or (spec.check(value) if spec.check else None)
    if kind == "bool":
        return None if isinstance(value, bool) else "must be true or false"
    if kind in LISTS:
        return _list_problem(value, kind, spec)
    if not isinstance(value, str):
        return "must be text" if spec.choices is None else f"must be one of {', '.join(map(str, spec.choices))}"
    problem = _text_problem(value, kind, spec)
    if problem:
        return problem
    if kind in PATHS:
        problem = _path_problem(Path(value), kind)
        if problem:
            return problem
    if spec.choices is not None and value not in spec.choices:
        return f"must be one of {', '.join(map(str, spec.choices))}"
    return spec.check(value) if spec.check else None


def _list_problem(value, kind: str, spec: Spec):
    """check_value for a list kind (LISTS): non-empty, bounded, each item valid, unique where asked."""
    if not isinstance(value, (list, tuple)) or not value:
        return "must list at least one value"
    if len(value) > MAX_LIST:
        return f"lists {len(value):,} values; the limit is {MAX_LIST:,}"
    for v in value:
        problem = check_value(v, LISTS[kind], spec)
        if problem:
            return f"has {shown(v)}, which {problem}"
    if spec.unique and len(set(value)) != len(value):
        return "repeats a seed" if kind == "seeds" else "repeats a value"
    return None


def require(name: str, value, kind: str, spec: Spec = Spec()) -> None:
    """HybridGPTError naming ``name`` if ``value`` is not a valid ``kind`` under ``spec``."""
    problem = check_value(value, kind, spec)
    if problem:
        raise HybridGPTError(f"{name} {problem}, got {shown(value)}")


_UNSET = object()  # stands for None where None is not a value: check_value then names what is expected


def check_fields(obj, prefix: str = "", *, none: bool = True) -> None:
    """HybridGPTError for the first field of dataclass ``obj`` outside its spec, naming the field after
    ``prefix``. ``none``: None is valid in every field (an option left unset); else in none."""
    kind_of = kinds(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        problem = check_value(_UNSET if value is None and not none else value, kind_of[f.name], spec_of(f))
        if problem:
            raise HybridGPTError(f"{prefix}{f.name} {problem}, got {shown(value)}")


def _parse(text: str, kind: str):
    """Text -> a value of ``kind``; ArgumentTypeError if it is not one."""
    if kind in ("int", "seed", "float"):
        try:
            return int(text.strip()) if kind != "float" else float(text)
        except ValueError:  # also Python's limit on the digits of an int
            expected = "a number" if kind == "float" else "a whole number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {shown(text)}") from None
    if kind in LISTS:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {shown(text)}")
        if kind == "strs":
            return parts
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {shown(text)}") from None
    return text


def parser_for(kind: str, spec: Spec) -> Callable[[str], object]:
    """An argparse ``type``: text -> checked value, or ArgumentTypeError naming the problem and the input."""
    own = spec if kind in LISTS else dataclasses.replace(spec, choices=None)  # argparse checks a single value's

    def parse(text: str):
        value = _parse(text, kind)
        problem = check_value(value, kind, own)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {shown(text)}")
        return value

    parse.__name__ = kind  # argparse names the type in some messages
    return parse


def _default_text(value) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_options(parser, cls, *, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
                overrides: bool = False, defaults: dict | None = None) -> None:
    """Add an argument for each field of dataclass ``cls`` (all of them, or ``only`` these; never ``exclude``).

    ``overrides``: every flag defaults to None, so an unset flag leaves the value to the library (a preset);
    the field's own default is then not shown in the help. ``defaults``: this command's own defaults of
    some fields (where one setting has a different default in two commands).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kind_of = kinds(cls)
    for name in only or tuple(fields):
        f, spec, kind = fields[name], spec_of(fields[name]), kind_of[name]
        if name in exclude or not spec.cli:
            continue
        own = f.default_factory() if f.default_factory is not MISSING else f.default
        default = None if overrides or own is MISSING else (defaults or {}).get(name, own)
        help_text = spec.help or ""
        if spec.show_default and not overrides and _default_text(default) and "default" not in help_text:
            help_text = f"{help_text} (default: {_default_text(default)})".strip()
        kw = dict(help=argparse.SUPPRESS if spec.hidden else (help_text or None))
        flags = spec.flags or (f"--{name.replace('_', '-')}",)
        if kind == "bool":
            parser.add_argument(*flags, dest=name, action="store_false" if own is True else "store_true",
                                default=default, **kw)
            continue
        kw.update(type=parser_for(kind, spec))
        if not spec.positional and (spec.choices is None or kind in LISTS):
            kw["metavar"] = METAVARS.get(kind)
        for key in ("metavar", "nargs", "required"):
            if getattr(spec, key) is not None:
                kw[key] = getattr(spec, key)
        if spec.choices is not None and kind not in LISTS:
            kw["choices"] = spec.choices
        if spec.positional:
            parser.add_argument(name, **kw)
        else:
            parser.add_argument(*flags, dest=name, default=default, **kw)


def values(args, cls, *, skip_none: bool = False) -> dict:
    """The values in argparse namespace ``args`` of those fields of ``cls`` that it holds."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if hasattr(args, f.name) and not (skip_none and getattr(args, f.name) is None)}
