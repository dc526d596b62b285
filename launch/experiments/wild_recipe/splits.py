"""Identity splits of an identity-folder set (celeba_299) for the in-the-wild recipe search (this folder's README).

    python launch/experiments/wild_recipe/splits.py SRC OUT [--seed 0] [--test 80] [--dev-test 35]

The identities, sorted by name and shuffled with `--seed`, are dealt into three disjoint groups: A's test
identities (the first `--test`), B's test identities (the next `--test`) and the development pool (the rest).
Split A trains on B's test identities plus the pool and tests on A's; split B the other way round; `dev` and
`dev2` train and test inside the pool only (their test sets: the pool's first and second `--dev-test`), so the
dev splits, where the recipe is chosen, never see a test identity of A or B, while their identities sit inside
both A's and B's training identities. Writes OUT/splits.json (split -> train / test identity lists) and
OUT/<split>/<train|test>/<identity> as symbolic links to SRC/<identity>: no photo is copied. Same arguments,
same splits; an OUT holding other splits is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np


def assign(identities: list[str], seed: int, test: int, dev_test: int) -> dict[str, dict[str, list[str]]]:
    """Split name -> {"train": identities, "test": identities}, both sorted (module docstring)."""
    names = sorted(identities)
    pool_size = len(names) - 2 * test
    if test < 2 or dev_test < 2 or pool_size < 2 * dev_test + 2:
        raise ValueError(
            f"{len(names)} identities cannot make two test sets of {test} (at least 2) and a development pool "
            f"with two test sets of {dev_test} (at least 2) plus 2 to train on"
        )
    shuffled = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    test_a, test_b, pool = shuffled[:test], shuffled[test : 2 * test], shuffled[2 * test :]
    dev_a, dev_b = pool[:dev_test], pool[dev_test : 2 * dev_test]
    chosen = {
        "A": (test_b + pool, test_a),
        "B": (test_a + pool, test_b),
        "dev": ([name for name in pool if name not in dev_a], dev_a),
        "dev2": ([name for name in pool if name not in dev_b], dev_b),
    }
    return {split: {"train": sorted(train), "test": sorted(held)} for split, (train, held) in chosen.items()}


def write_splits(src: Path, out: Path, splits: dict[str, dict[str, list[str]]]) -> bool:
    """Write OUT (module docstring) whole or not at all; False when OUT already holds exactly these splits."""
    manifest = json.dumps(splits, indent=1) + "\n"
    if out.exists():
        if (out / "splits.json").is_file() and (out / "splits.json").read_text() == manifest:
            return False
        raise ValueError(f"{out}: already holds other splits (delete it to redo them)")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for split, roles in splits.items():
        for role, names in roles.items():
            (partial / split / role).mkdir(parents=True)
            for name in names:
                (partial / split / role / name).symlink_to((src / name).resolve(), target_is_directory=True)
    (partial / "splits.json").write_text(manifest)
    os.replace(partial, out)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("src", type=Path, help="identity folders SRC/<identity>/<image>")
    parser.add_argument("out", type=Path, help="folder to write (splits.json and the link trees)")
    parser.add_argument("--seed", type=int, default=0, help="shuffles the identities")
    parser.add_argument("--test", type=int, default=80, help="test identities of split A, and as many of B")
    parser.add_argument("--dev-test", type=int, default=35, help="test identities of dev, and as many of dev2")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        print(f"{args.src}: no such folder of identities", file=sys.stderr)
        return 2
    identities = [entry.name for entry in args.src.iterdir() if entry.is_dir()]
    try:
        splits = assign(identities, args.seed, args.test, args.dev_test)
        written = write_splits(args.src, args.out, splits)
    except ValueError as err:
        print(f"{args.src}: {err}" if "identities cannot" in str(err) else err, file=sys.stderr)
        return 2
    sizes = ", ".join(f"{split} {len(r['train'])} train / {len(r['test'])} test" for split, r in splits.items())
    print(f"{args.out}: {'written' if written else 'already there'} ({sizes} identities)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
