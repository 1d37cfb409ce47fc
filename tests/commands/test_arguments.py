"""Every option of every `m3d-lit` tool says what it does and what it is when not given."""

from __future__ import annotations

import argparse
import importlib

import pytest

from m3d_lit.cli import SUBCOMMANDS
from m3d_lit.commands.arguments import CommandParser, HelpFormatter

# the tools, and the demo `make demo` runs
MODULES = {**{name: module for name, (module, _) in SUBCOMMANDS.items()}, "demo": "m3d_lit.commands.demo"}


class _Parsed(Exception):
    """Raised in place of parsing: the test has the parser it wanted."""


def _parser(module: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    seen: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        seen.append(self)
        raise _Parsed

    # every parser, not only CommandParser's: a tool on a plain one must fail here, not run
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed):
        importlib.import_module(module).main([])
    return seen[0]


@pytest.mark.parametrize("command", sorted(MODULES))
def test_every_option_has_a_help_text_and_shows_its_default(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = _parser(MODULES[command], monkeypatch)
    if command in SUBCOMMANDS:  # a mistake is one line and exit 2 (the demo is `make demo`'s script)
        assert isinstance(parser, CommandParser), f"{command} parses with a plain ArgumentParser"
    assert parser.formatter_class is HelpFormatter, f"{command} --help does not show the defaults"
    formatter = HelpFormatter(parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{command} {name} has no help text"
        if action.option_strings and not action.required and action.nargs != 0:
            assert "default" in formatter._get_help_string(action), f"{command} {name} shows no default"
    text = parser.format_help()
    assert "(default: none)" not in text.replace("(default: none, the preset)", ""), (
        f"{command}: say what happens without the option instead of 'none'"
    )


def test_defaults_are_shown_as_typed() -> None:
    parser = CommandParser(prog="x")
    parser.add_argument("--size", type=int, nargs=3, default=(32, 256, 256), help="D H W")
    parser.add_argument("--share", type=float, default=0.5, help="a share, in %%")
    parser.add_argument("--flag", action="store_true", help="off unless given")
    text = " ".join(parser.format_help().split())
    assert "D H W (default: 32 256 256)" in text and "a share, in % (default: 0.5)" in text
    assert "off unless given" in text and "off unless given (default" not in text
