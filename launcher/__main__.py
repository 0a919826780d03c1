"""`performer <subcommand>`: the project's one command-line tool.

Each area owns its subcommands and registers them here through an ``add_parser(subparsers)``
function, so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from launcher.errors import run_command

# (subcommand, module that owns it). The module exposes add_parser(subparsers); the parser it
# adds sets `func`, called with the parsed arguments and returning an exit code.
SUBCOMMAND_OWNERS: tuple[tuple[str, str], ...] = (
    ("data", "data.cli"),
    ("pretrain", "launcher.pretrain"),
    ("export", "launcher.commands.export"),
    ("generate", "launcher.commands.generate"),
    ("slurm", "launcher.commands.slurm"),
    ("doctor", "launcher.commands.doctor"),
    ("check", "launcher.commands.check"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="performer",
        description="Pretrain, export and sample encoder-decoder Performer transformers.",
    )
    # `deepspeed --module launcher COMMAND` puts --local_rank=N before COMMAND; ranks come from the env.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _name, module_name in SUBCOMMAND_OWNERS:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a bad input is one line on stderr and exit code 2 (launcher.errors)."""
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
