"""Every option of facedist-eval, -compare, -embed and -export has a help line, and `--help` shows its default."""

import argparse

import pytest

from facedist.cli_common import shows_default
from facedist.evaluation.cli import build_parser
from facedist.inference_cli import compare_parser, embed_parser, export_parser


@pytest.mark.parametrize("make", [build_parser, compare_parser, embed_parser, export_parser])
def test_every_option_has_help_and_shows_its_default(make):
    parser = make()
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{parser.prog} {name}: no help line"
        if action.default is not False and action.default not in (None, [], argparse.SUPPRESS) and not action.required:
            shown = f"(default: {action.default})" if shows_default(action) else "default"
            assert shown in text, f"{parser.prog} {name}: default {action.default!r} not shown"
        elif action.default is None and not action.required and action.option_strings and action.nargs != 0:
            # no default value: the help says what happens without it, or it is one choice of a required group
            one_of = action.container.title.startswith("data (one of") or name in ("--onnx", "--safetensors")
            assert one_of or "default" in action.help, f"{parser.prog} {name}: what happens without it?"


def test_compare_help_says_which_far_it_uses():
    text = " ".join(compare_parser().format_help().split())
    assert "--far FAR" in text and "(default: 1e-03 where the evaluation" in text
