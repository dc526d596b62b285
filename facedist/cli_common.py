"""What facedist's command lines share: `--help` that shows every option's default, and the options of
every command that embeds images.

argparse's own ArgumentDefaultsHelpFormatter prints "(default: None)" and "(default: False)", which say
nothing; this formatter appends "(default: X)" only where X is a value a user would type, and leaves
options without one (a flag, a required option, one whose help says what happens without it) as written.
"""

from __future__ import annotations

import argparse

from facedist.inference import MIN_IMAGE_SIZE


def shows_default(action: argparse.Action) -> bool:
    """Whether `action`'s help gets "(default: X)" appended."""
    return (
        action.default is not False  # a flag; `not in (False, ...)` would also hide a default of 0
        and action.default not in (None, argparse.SUPPRESS, [])
        and not action.required
        and "%(default)" not in (action.help or "")
        and "default" not in (action.help or "")
    )


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to the help of every option with a default value (see shows_default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return f"{action.help} (default: %(default)s)" if shows_default(action) else action.help or ""


def add_embedding_options(parser: argparse.ArgumentParser, batches: bool = True) -> None:
    """How images are prepared and where the model runs (facedist-eval, -compare, -embed)."""
    parser.add_argument("--align", action="store_true", help="detect and align faces first (raw photos)")
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        help="flip test-time augmentation (default: as the checkpoint records, eval.flip)",
    )
    parser.add_argument(
        "--min-size",
        type=int,
        default=MIN_IMAGE_SIZE,
        help="refuse images whose shorter side is below this many pixels (0: no minimum)",
    )
    if batches:
        parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
        parser.add_argument("--num-workers", type=int, default=2, help="image-decoding worker processes")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
