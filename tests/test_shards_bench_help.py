"""Every option of `facedist-shards` (each subcommand) and `python -m facedist.bench` (each benchmark) has a help
line, and `--help` shows its default."""

import argparse
import importlib

import pytest

from facedist.bench import BENCHMARKS
from facedist.data import cli as shards_cli


def _commands(parser: argparse.ArgumentParser, name: str) -> list[tuple[str, argparse.ArgumentParser]]:
    """The parser and each of its subcommands' parsers, by their command line."""
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, subparser in action.choices.items():
                found += _commands(subparser, f"{name} {command}")
    return found


def _unhelpful(name: str, parser: argparse.ArgumentParser) -> list[str]:
    """Arguments with no help line, and defaults that --help does not show."""
    rendered = " ".join(parser.format_help().split())  # argparse wraps lines
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        argument = "/".join(action.option_strings) or action.dest
        has_default = action.default not in (None, argparse.SUPPRESS, []) and action.default is not False
        if not action.help:
            problems.append(f"{name} {argument}: no help")
        elif has_default and not action.required and "default" not in action.help:
            if f"{action.help} (default: {action.default})" not in rendered:
                problems.append(f"{name} {argument}: default {action.default!r} not shown")
    return problems


PARSERS = {
    "facedist-shards": shards_cli._parser,
    **{f"facedist.bench {name}": importlib.import_module(f"facedist.benchmarks.{name}")._parser for name in BENCHMARKS},
}


@pytest.mark.parametrize("program", sorted(PARSERS))
def test_every_option_has_help_and_shows_its_default(program, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a long default would otherwise wrap mid-word
    problems = [
        problem for name, parser in _commands(PARSERS[program](), program) for problem in _unhelpful(name, parser)
    ]
    assert problems == []


def test_bench_help_lists_every_benchmark_and_a_wrong_name_is_refused(capsys):
    from facedist.bench import main

    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name:7s} {what}" in listed for name, what in BENCHMARKS.items())
    assert main(["nope"]) == 2 and "usage: python -m facedist.bench" in capsys.readouterr().err
