"""The one args layer of every command-line tool.

A tool's options are one dataclass deriving from `Options`, its fields declared with `opt`: that
declaration is the single source of the tool's flags (and --help), of its YAML keys (`--config`,
groups as sections) and of its range checks. `run_cli` sets up logging and maps errors to exit
codes the same way for every tool. Below: the typed argparse values the older parsers use.


Each factory returns an argparse `type=` callable that turns the string into a value or raises
`argparse.ArgumentTypeError` with what was wrong; `Parser` reports it in one line that names the
option and exits 2, before any model loads, any request is sent or anything is written:

    p = Parser(prog="cut.x")
    p.add_argument("--seed", type=integer(0, 2**32 - 1), default=0)
    p.add_argument("--temperature", type=number(0, None), default=0.7)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, NoReturn, TypeVar

from cut.errors import ConfigError, EngineError

# the largest value a whole-number / real option takes: beyond them a value is a typo
# (99999999999999999999) that overflows an int32 index, a time stamp or a half-precision product
# downstream, after a model has loaded; every tool checks its numbers against these
INT_MAX = 2**31 - 1
FLOAT_MAX = 1e6


T = TypeVar("T", bound="Options")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `prog: error: argument --x: why` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """A finite float in [lo, hi] (open ends with lo_open / hi_open; None = unbounded)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if (lo is not None and (value < lo or (lo_open and value == lo))) or (
            hi is not None and (value > hi or (hi_open and value == hi))
        ):
            raise argparse.ArgumentTypeError(f"must be in {_bounds(lo, hi, lo_open, hi_open)}, got {text!r}")
        return value

    return parse


def integer(lo: int | None = None, hi: int | None = None):
    """A whole number in [lo, hi] (None = unbounded); '3.0', 'nan', '1e99' are refused."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be in {_bounds(lo, hi, False, False)}, got {text!r}")
        return value

    return parse


SEED = integer(0, 2**32 - 1)  # what numpy / torch / random all accept


def die(prog: str, message: str) -> NoReturn:
    """The same one-line error for a check that needs more than one option."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# One args layer: a tool's options are one dataclass. Its fields (declared with `opt`) are the
# single source of the tool's flags, of the keys of its YAML (--config; nested sections for groups)
# and of its range checks; `run_cli` sets up logging and maps errors to exit codes for every tool.
# ---------------------------------------------------------------------------------------------


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    choices: Sequence[Any] | None = None,
    flags: Sequence[str] = (),
    required: bool = False,
    metavar: str | None = None,
    cli: bool = True,
    parse: Callable[[str], Any] | None = None,
    append: bool = False,
    nargs: str | None = None,
) -> Any:
    """A dataclass field that is an option: its help, its range (lo / hi, inclusive unless *_open;
    numbers default to at most INT_MAX / FLOAT_MAX), its choices, extra flag spellings (`flags`,
    e.g. ("--lora_weights",)), and whether it must be given. cli=False: YAML only (a mapping).
    parse: an argparse type (`integer`, `number`, ...) the flag's text goes through, so a refused
    value reads `argument --x: must be ...`; a YAML or Python value is checked by it too, as text.
    append: a list option whose flag may be repeated, each one item (`--stop A --stop B`).
    nargs: argparse's, for a list option whose flag takes several words (`--runs a b`)."""
    meta = {
        "help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
        "choices": tuple(choices) if choices is not None else None, "flags": tuple(flags),
        "required": required, "metavar": metavar, "cli": cli, "parse": parse,
        "append": append, "nargs": nargs,
    }  # fmt: skip
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    if default is dataclasses.MISSING:
        default = None
    return dataclasses.field(default=default, metadata=meta)


def group(cls: type) -> Any:
    """A field holding a group of options (a dataclass): a section of the YAML, flags flattened."""
    return dataclasses.field(default_factory=cls, metadata={"group": True})


def parse_list(value: Any) -> list[str]:
    """A list from YAML, JSON text ('["a","b"]'), fire style ('[a,b]') or 'a,b'."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in json.loads(text)]
        except json.JSONDecodeError:
            text = text[1:-1]
    return [p.strip().strip("'\"") for p in text.split(",") if p.strip()]


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _plain_type(tp: Any) -> tuple[Any, bool]:
    """(the type without Optional, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        return (inner[0] if len(inner) == 1 else tp), type(None) in args
    return tp, False


def coerce_value(tp: Any, name: str, value: Any) -> Any:
    """A YAML / CLI value as the field's type; a ConfigError names the option."""
    tp, optional = _plain_type(tp)
    if value is None and optional:
        return None
    origin = typing.get_origin(tp)
    try:
        if origin is list or tp is list:
            return parse_list(value)
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                raise ValueError(f"must be a mapping, got {value!r}")
            return value
        if tp is bool:
            return parse_bool(value)
        if tp in (int, float) and isinstance(value, bool):  # YAML `true` is no count
            raise ValueError(f"not a number: {value!r}")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"not a whole number: {value!r}")
            if isinstance(value, str) and "e" in value.lower():  # 1e3 from YAML / CLI
                as_float = float(value)
                if not as_float.is_integer():
                    raise ValueError(f"not a whole number: {value!r}")
                return int(as_float)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if isinstance(value, bool):  # YAML `false` means unset, not the string "False"
                return "true" if value else ""
            return "" if value is None else str(value)
    except (TypeError, ValueError, OverflowError) as err:
        raise ConfigError(f"option {name}: {err}") from None
    return value


def check_field(name: str, value: Any, f: dataclasses.Field, tp: Any) -> None:
    """One option against its declaration: finite, in range, one of its choices."""
    meta = f.metadata
    plain, optional = _plain_type(tp)
    if value is None:
        if meta.get("required") or not optional and plain is not str:
            raise ConfigError(f"missing required option --{name}")
        return
    parse = meta.get("parse")
    if parse is not None:  # the flag's own check, on the value as text (str(True) is no number)
        try:
            for item in value if isinstance(value, list) else [value]:
                parse(str(item))
        except argparse.ArgumentTypeError as err:
            raise ConfigError(f"{name} {err}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if plain in (int, float) and not isinstance(value, bool):
        lo, hi = meta.get("lo"), meta.get("hi")
        lo_open, hi_open = meta.get("lo_open", False), meta.get("hi_open", False)
        if lo is not None and hi is not None:  # a declared interval is named whole: [0, 1)
            if value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
                raise ConfigError(f"{name} must be in {_bounds(lo, hi, lo_open, hi_open)}, got {value}")
        if hi is None:
            hi = INT_MAX if plain is int else FLOAT_MAX
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise ConfigError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
        if value > hi or (hi_open and value == hi):
            raise ConfigError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")
    choices = meta.get("choices")
    if choices is not None:
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in choices]
        if bad:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {bad[0]!r}")
    if meta.get("required") and value in ("", [], {}):
        raise ConfigError(f"missing required option --{name}")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config as a mapping; a ConfigError names the file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of option names to values")
    return data


@dataclasses.dataclass
class Options:
    """Base of every tool's options. A subclass declares its fields with `opt` (or `group` for a
    section of options) and may override `validate` for rules between fields:

        @dataclass
        class MergeOptions(Options):
            base_model: str = opt("", "the base model", required=True)
            dtype: str = opt("auto", "dtype of the merged weights", choices=DTYPES)

        opts = MergeOptions.parse(argv, prog="cut.merge")   # defaults <- --config <- flags, checked
    """

    DESCRIPTION: ClassVar[str] = ""
    # --config's help, for a tool whose --config is a file of its own (not these options' YAML)
    CONFIG_HELP: ClassVar[str] = "YAML file of these options (keys = option names; groups as sections)"

    # ---- declaration -------------------------------------------------------------------------
    @classmethod
    def option_fields(cls) -> dict[str, tuple[dataclasses.Field, Any, tuple[str, ...]]]:
        """name -> (field, type, group path) of every option, groups flattened."""
        out: dict[str, tuple[dataclasses.Field, Any, tuple[str, ...]]] = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("group"):
                sub = hints[f.name]
                for name, (sf, stp, path) in sub.option_fields().items():
                    out[name] = (sf, stp, (f.name, *path))
            else:
                out[f.name] = (f, hints[f.name], ())
        return out

    # ---- sources -----------------------------------------------------------------------------
    @classmethod
    def flatten(cls, values: dict[str, Any], source: str) -> dict[str, Any]:
        """A YAML mapping with optional group sections -> option name -> value; unknown keys named."""
        groups = {f.name for f in dataclasses.fields(cls) if f.metadata.get("group")}
        known = cls.option_fields()
        flat: dict[str, Any] = {}
        for key, value in values.items():
            if key in groups and isinstance(value, dict):
                sub = typing.get_type_hints(cls)[key]
                flat.update(sub.flatten(value, f"{source}: {key}"))
            else:
                flat[key] = value
        unknown = sorted(set(flat) - set(known) - set(cls.extra_keys()))
        if unknown:
            raise ConfigError(f"{source}: unknown option(s): {', '.join(unknown)}")
        return flat

    @classmethod
    def extra_keys(cls) -> tuple[str, ...]:
        """Keys a subclass accepts beyond its fields (aliases it resolves in `from_values`)."""
        return ()

    @classmethod
    def from_values(cls: type[T], values: dict[str, Any], check: bool = True) -> T:
        """An instance from option name -> value (groups flattened or as sections), coerced and,
        with check, checked."""
        flat = cls.flatten(values, "options")
        fields = cls.option_fields()
        coerced = {k: coerce_value(fields[k][1], k, v) for k, v in flat.items() if k in fields}
        obj = cls._build(coerced)
        if check:
            obj.check()
        return obj

    @classmethod
    def _build(cls: type[T], flat: dict[str, Any]) -> T:
        kwargs: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("group"):
                sub = hints[f.name]
                mine = {k: v for k, v in flat.items() if k in sub.option_fields()}
                kwargs[f.name] = sub._build(mine)
            elif f.name in flat:
                kwargs[f.name] = flat[f.name]
        return cls(**kwargs)

    # ---- checks ------------------------------------------------------------------------------
    def check(self) -> None:
        """Every option against its declaration, then the rules between options (`validate`)."""
        self.check_fields()
        self.validate()

    def check_fields(self) -> None:
        """Every option against its declaration alone: required ones given, finite, in range, in
        its choices; a ConfigError names the first that is not."""
        fields = type(self).option_fields()
        missing = [
            f"--{name}"
            for name, (f, _tp, _path) in fields.items()
            if f.metadata.get("required") and self.get(name) in (None, "", [], {})
        ]
        if missing:
            raise ConfigError(f"missing required option(s): {', '.join(missing)}")
        for name, (f, tp, _path) in fields.items():
            check_field(name, self.get(name), f, tp)

    def validate(self) -> None:
        """Rules between options; a subclass raises ConfigError naming them."""

    # ---- access ------------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        f, tp, path = type(self).option_fields()[name]
        obj: Any = self
        for part in path:
            obj = getattr(obj, part)
        return getattr(obj, name)

    def flat(self) -> dict[str, Any]:
        """option name -> value, groups flattened."""
        return {name: self.get(name) for name in type(self).option_fields()}

    def to_dict(self) -> dict[str, Any]:
        """As YAML would hold it: groups as sections."""
        return dataclasses.asdict(self)

    # ---- command line ------------------------------------------------------------------------
    @classmethod
    def build_parser(cls, prog: str, description: str | None = None) -> Parser:
        """Every option as a flag (defaults shown in --help), plus --config."""
        parser = Parser(
            prog=prog,
            description=description or cls.DESCRIPTION or (cls.__doc__ or "").split("\n")[0],
            argument_default=argparse.SUPPRESS,
            allow_abbrev=False,
        )
        parser.add_argument("--config", help=cls.CONFIG_HELP)
        sections: dict[tuple[str, ...], Any] = {(): parser}
        for name, (f, tp, path) in cls.option_fields().items():
            meta = f.metadata
            if not meta.get("cli", True):
                continue
            if path not in sections:
                sections[path] = parser.add_argument_group(".".join(path))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = (
                "" if meta.get("required") and default in (None, "", [], {}) else f" (default: {default!r})"
            )
            kw: dict[str, Any] = {
                "help": f"{meta.get('help', '')}{shown}",
                "metavar": meta.get("metavar") or name.upper(),
            }
            plain, _ = _plain_type(tp)
            if meta.get("parse") is not None:
                kw["type"] = meta["parse"]
            if meta.get("append"):
                kw["action"] = "append"
            elif plain is bool:
                kw.update(nargs="?", const="true")
            elif meta.get("choices") and plain is str:
                kw["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
            if meta.get("nargs") and plain is not bool:
                kw["nargs"] = meta["nargs"]
            sections[path].add_argument(f"--{name}", *meta.get("flags", ()), dest=name, **kw)
        cls.add_extra_flags(parser)
        return parser

    @classmethod
    def add_extra_flags(cls, parser: Parser) -> None:
        """Flags that are no field (a subclass's aliases); their values reach `from_sources`."""

    @classmethod
    def from_sources(cls: type[T], config: dict[str, Any], flags: dict[str, Any], config_path: str = "") -> T:
        """defaults <- YAML <- flags; a subclass may resolve aliases here before calling super."""
        values = cls.flatten(config, config_path or "config")
        values.update(flags)
        return cls.from_values(values)

    @classmethod
    def parse(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
        """The options of one run: defaults <- --config YAML <- flags, coerced and checked. Every
        problem is one line naming the option, exit 2, before any work."""
        prog = prog or cls.__name__
        parser = cls.build_parser(prog)
        args = vars(parser.parse_args(argv))
        path = args.pop("config", None)
        try:
            config = load_yaml(path) if path else {}
            return cls.from_sources(config, args, path or "")
        except ConfigError as err:
            parser.error(str(err))  # exits 2


# ---------------------------------------------------------------------------------------------
# run_cli: one way every tool starts and ends
# ---------------------------------------------------------------------------------------------

LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """INFO lines with time and logger name, once per process (a second call changes nothing)."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S")


def run_cli(prog: str, body: Callable[[], int | None]) -> int:
    """Run a tool's body with logging set up; its errors become one line `prog: error: ...` on
    stderr and an exit status: bad input, options or engine (ValueError, including every CutError,
    EngineError, a missing file) 2; another OS error (a disk that cannot be written, a model that
    cannot be read) 1; Ctrl-C 130. argparse's own exits (2, --help 0) pass through."""
    setup_logging()
    try:
        return int(body() or 0)
    except (ValueError, EngineError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
