"""The ``nnlab`` command line. Thin: it parses options and calls the library.

Each sub-command lives in its own module ``nnlab.cli.<name>`` exposing ``register(subparsers)``,
which adds a parser with ``set_defaults(func=..., _parser=<that parser>)``; ``func`` receives the
parsed namespace. A parser that defines ``--config`` gets YAML defaults under explicit flags.
Modules are discovered automatically, so adding a command needs no edit here.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from typing import Sequence

from nnlab.config import apply_config_defaults
from nnlab.errors import NnlabError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line that says where to look for help."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_command_group(subparsers, name: str, help: str, description: str | None = None):
    """``nnlab NAME ACTION ...``: the parser of command ``name`` and its (required) ACTION subparsers."""
    parser = subparsers.add_parser(name, help=help, description=description)
    actions = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION")
    actions.required = True
    return actions


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="nnlab", description=__doc__.splitlines()[0])
    from nnlab import __version__

    parser.add_argument("--version", action="version", version=f"nnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def passive_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy: on a busy machine spinning OpenMP
    threads wait on each other and small-model CPU training ran up to ~8x slower. Only the command
    line does this (before the sub-commands import torch); importing nnlab changes nothing."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nnlab`` console script; returns the exit status."""
    passive_openmp()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        if getattr(args, "config", None):  # file values become defaults, explicit flags still win
            apply_config_defaults(args._parser, args.config)
            args = parser.parse_args(argv)
        result = args.func(args)
    except NnlabError as exc:  # one line, even when the message quotes a multi-line library error
        print(f"nnlab: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nnlab: interrupted; run again with --resume to continue", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
