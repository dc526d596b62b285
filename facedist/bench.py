"""Benchmarks that print figures (JSON), never pass/fail.

python -m facedist.bench {shards,train,head,data,eval,model,loss,align} ...
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "shards": "shard conversion throughput (images/s) for 1 and 2 workers",
    "train": "training images/s: model only, data only, end to end, and a plain baseline loop",
    "head": "sharded margin head: memory per rank and step time for 10k..1M identities",
    "data": "training input pipeline per core (read, decode, warp, device step) vs the previous pipeline",
    "eval": "1:1 verification: pairs scored per second for 10k and 50k embeddings",
    "model": "parameters and FLOPs/MACs of embedding models (torch's flop counter)",
    "loss": "pair losses over a global batch of 1,024 / 4,096: peak memory and time per rank",
    "align": "face aligners per core on celeba_299 and ORL: detection rate, images/s, YuNet vs Haar",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        asked = argv[:1] in (["-h"], ["--help"])
        print(
            "usage: python -m facedist.bench {"
            + ",".join(BENCHMARKS)
            + "} [options]   (each benchmark's options: python -m facedist.bench NAME --help)\n"
            + "\n".join(f"  {name:7s} {what}" for name, what in BENCHMARKS.items()),
            file=sys.stdout if asked else sys.stderr,
        )
        return 0 if asked else 2
    module = importlib.import_module(f"facedist.benchmarks.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
