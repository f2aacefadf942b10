"""Configuration helpers: YAML config files merged under command-line overrides, and run configs.

Precedence (lowest to highest): the dataclass defaults, ``--config FILE.yaml``, explicit flags.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from nnlab.errors import ConfigError

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a :class:`ConfigError` naming the file for anything else."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file (e.g. {path}/config.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def apply_config_defaults(parser: argparse.ArgumentParser, path: str | Path) -> None:
    """Make the values in YAML file ``path`` the defaults of ``parser``, so explicit flags still win.

    Keys must be option destinations of ``parser`` (dashes or underscores); others raise ConfigError.
    """
    values = load_yaml(path)
    known = {a.dest for a in parser._actions} - {"help", "config"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"config file {path} has unknown option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(sorted(k for k in known if not k.startswith('_')))}"
        )
    parser.set_defaults(**values)


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from ``values``, ignoring keys it lacks and ``None`` values."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in values.items() if k in names and v is not None})


def float_list(text: str) -> list[float]:
    """argparse type: ``"0.1,0.2"`` -> ``[0.1, 0.2]``."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def int_list(text: str) -> list[int]:
    """argparse type: ``"256,256"`` -> ``[256, 256]``."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def str_list(text: str) -> list[str]:
    """argparse type: ``"a,b"`` -> ``["a", "b"]``."""
    return [x.strip() for x in text.split(",") if x.strip()]


def field_help(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in dataclass ``cls``'s source (and its base classes'):
    its help text. A subclass that only changes defaults keeps its bases' help."""
    import inspect
    import re

    pattern, helps = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$"), {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        helps.update({m.group(1): m.group(2).strip() for m in map(pattern.match, source.splitlines()) if m})
    return helps


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                          prefix: str = "", aliases: dict[str, str] | None = None,
                          only: tuple[str, ...] | None = None, default_note: str | None = None) -> list[str]:
    """Add one ``--field-name`` flag per scalar or list field of dataclass ``cls`` (type, default and
    help from the dataclass itself: the one source of defaults; booleans get ``--x`` and ``--no-x``,
    ``list[float|int|str]`` fields take comma-separated values). Flags default to None, so only
    explicit ones override; :func:`dataclass_from_args` builds the dataclass. ``prefix`` (e.g.
    ``"pvit"``) names the flags ``--pvit-field`` with destination ``pvit_field``, for a nested
    options dataclass; ``aliases`` maps a field to one more flag spelling; ``only`` keeps just those
    fields; ``default_note`` (e.g. ``"the preset's"``) replaces the dataclass default in the help, for
    flags that override a preset rather than the bare dataclass. Returns the fields added."""
    helps, names, aliases = field_help(cls), [], aliases or {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in skip or (only is not None and f.name not in only):
            continue
        dest = f"{prefix}_{f.name}" if prefix else f.name
        flags = ["--" + dest.replace("_", "-")] + ([aliases[f.name]] if f.name in aliases else [])
        spec = _flag_spec(f, helps.get(f.name, ""))
        if spec is None:
            continue  # dicts and nested dataclasses: set them in a config file (or their own flags)
        if default_note:
            spec["help"] = f"{helps.get(f.name, '')} (default: {default_note})".strip()
        parser.add_argument(*flags, dest=dest, default=None, **spec)
        names.append(f.name)
    return names


def _flag_spec(f: dataclasses.Field, text: str) -> dict[str, Any] | None:
    """argparse keyword arguments (type/action, metavar, help) for dataclass field ``f``."""
    if f.default is dataclasses.MISSING:  # default_factory: lists get comma-separated values
        parse = _list_parser(f.type)
        if parse is None:
            return None
        shown = ",".join(map(str, f.default_factory()))  # type: ignore[misc]
        return dict(type=parse, metavar="A,B,...", help=f"{text} (default {shown or 'empty'})".strip())
    if isinstance(f.default, bool):  # --x / --no-x: a preset may have turned it on or off
        return dict(action=argparse.BooleanOptionalAction,
                    help=f"{text} (default {'on' if f.default else 'off'})" if text else None)
    if f.default is None and str(f.type).replace(" ", "") in ("bool|None", "None|bool"):  # unset, on or off
        return dict(action=argparse.BooleanOptionalAction, help=f"{text} (default unset)" if text else None)
    if f.default is None and _optional_scalar(f.type) is not None:  # ``int | None`` and the like
        return dict(type=_optional_scalar(f.type), metavar=f.name.upper(),
                    help=f"{text} (default unset)" if text else "default unset")
    if not isinstance(f.default, (int, float, str)):
        return None
    kind = float if type(f.default) is float else type(f.default)
    return dict(type=kind, metavar=f.name.upper(), help=f"{text} (default {f.default})" if text else
                f"default {f.default}")


def _list_parser(annotation):
    """float_list / int_list / str_list for an annotation ``list[float]`` etc.; None otherwise."""
    text = annotation if isinstance(annotation, str) else str(annotation)
    return {"list[float]": float_list, "list[int]": int_list, "list[str]": str_list}.get(text.replace(" ", ""))


def _optional_scalar(annotation) -> type | None:
    """int / float / str for an annotation ``X | None`` (a string under ``from __future__ import
    annotations``); None for anything else."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = {p.strip() for p in text.split("|")}
    scalars = [t for t in (int, float, str) if t.__name__ in parts]
    return scalars[0] if len(scalars) == 1 and parts <= {scalars[0].__name__, "None"} else None


def dataclass_from_args(cls: type[T], args: argparse.Namespace, prefix: str = "", **extra: Any) -> T:
    """``cls`` from the dataclass defaults with the flags that were given (not None) on top; with
    ``prefix``, from the flags :func:`add_dataclass_options` added under that prefix. ``extra``
    fields (e.g. nested option dataclasses) are passed as they are."""
    values = vars(args)
    if prefix:
        values = {k[len(prefix) + 1:]: v for k, v in values.items() if k.startswith(prefix + "_")}
    return from_dict(cls, {**values, **extra})
