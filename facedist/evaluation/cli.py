"""`facedist-eval`: embed held-out faces with a checkpoint and write the verification/identification report.

    facedist-eval --checkpoint RUN_OR_CKPT --shards DIR [--split test] --out DIR [--[no-]flip] [--tsne]
    facedist-eval --checkpoint RUN_OR_CKPT --folder DIR --out DIR
    facedist-eval --checkpoint RUN_OR_CKPT --pairs pairs.txt --folder IMAGES --out DIR [--align]
    facedist-eval --checkpoint RUN_OR_CKPT --bin lfw.bin [--bin cfp_fp.bin ...] --out DIR
    facedist-eval --checkpoint RUN_OR_CKPT --ijb IJB_C_DIR --ijb-name IJBC --out DIR

With --bin: the published protocol of InsightFace's verification sets (facedist.evaluation.bins) plus
AUC / EER / TAR@FAR, in OUT/<set>/metrics.json, OUT/<set>/roc.png and OUT/<set>_embeddings.npz.
With --ijb: IJB-B/C 1:1 TAR@FAR from the released files (facedist.evaluation.ijb), in OUT/metrics.json,
OUT/roc.png and OUT/<name>_scores.npz.
Otherwise writes into --out what facedist.evaluation.report writes (metrics.json, roc.png, pr.png, score histogram,
t-SNE, TensorBoard under --out/tensorboard), and `<checkpoint_dir>/thresholds.json`: the cosine
thresholds at each resolvable FAR, which facedist-compare uses. Images that cannot be embedded (unreadable,
too small, no face under --align) are left out and listed with their reason in --out/skipped.json;
`--strict` exits 1 and writes nothing instead. Launch with `accelerate launch -m
facedist.evaluation.cli ...` to split the embedding across processes (the report is made on the main one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from facedist import distributed
from facedist.align import AlignerMissingError, require_aligner
from facedist.checkpoint import CheckpointError, load_embedding_model
from facedist.cli_common import DefaultsHelpFormatter, add_embedding_options
from facedist.data.pairs import PairsError, pair_images
from facedist.data.shards import ShardError
from facedist.durable import write_atomic
from facedist.inference import (
    ImageDataset,
    ImageError,
    ShardImages,
    account_for_skipped,
    embed_dataset,
    flip_default,
    list_images,
    shown_path,
)

THRESHOLDS_FILE = "thresholds.json"
SKIPPED_FILE = "skipped.json"


def write_thresholds(checkpoint_dir: Path, metrics: dict, source: str, flip: bool, align: bool) -> Path:
    """Store the cosine threshold at each resolvable FAR next to the checkpoint, for facedist-compare."""
    far = {k: float(v) for k, v in metrics["thresholds_at_far"].items() if v is not None}
    record = {"far": far, "source": source, "flip": flip, "align": align, "num_impostor": metrics["num_impostor"]}
    path = checkpoint_dir / THRESHOLDS_FILE
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facedist-eval", description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint dir, training output_dir (latest) or model.safetensors"
    )
    source = parser.add_argument_group("data (one of --shards, --folder, --pairs with --folder, --bin, --ijb)")
    source.add_argument("--shards", help="shard folder (facedist-shards build)")
    source.add_argument("--split", default="test", help="shard split")
    source.add_argument(
        "--folder",
        help="identity-folder tree DIR/<identity>/<image> (symbolic links followed), or the image root of --pairs",
    )
    source.add_argument(
        "--pairs",
        help="LFW-style pairs.txt (facedist.data.pairs); images FOLDER/NAME/NAME_0001.jpg, or else the i-th file of "
        "the identity's sorted list",
    )
    source.add_argument("--bin", action="append", default=[], help="InsightFace verification set (lfw.bin); repeatable")
    source.add_argument("--ijb", help="IJB-B/C folder as released (meta/, loose_crop/)")
    source.add_argument("--ijb-name", choices=("IJBB", "IJBC"), default="IJBC", help="which IJB set --ijb holds")
    parser.add_argument("--out", required=True, help="folder for metrics.json, plots and TensorBoard")
    parser.add_argument("--tsne", action="store_true", help="also plot a t-SNE of the embeddings")
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"exit 1 and write nothing when any image cannot be embedded (else listed in OUT/{SKIPPED_FILE})",
    )
    add_embedding_options(parser)
    return parser


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum(map(bool, (args.shards, args.folder, args.bin, args.ijb))) != 1:
        parser.error(
            "give exactly one of --shards DIR, --folder DIR, --bin FILE or --ijb DIR "
            "(--pairs needs --folder as image root)"
        )
    if args.pairs and not args.folder:
        parser.error("--pairs needs --folder (the image root)")
    if args.batch_size <= 0:
        parser.error(f"--batch-size must be > 0, got {args.batch_size}")
    return args


def _dataset(args, preprocessing: dict):
    """(ImageDataset, labels per item, pairs or None, description of the data); the dataset's names say
    which image each item is (file paths, or shard samples)."""
    if args.shards:
        from facedist.data.index import ShardIndex

        images = ShardImages(ShardIndex(args.shards, args.split), int(preprocessing["image_size"]))
        dataset = ImageDataset(images, preprocessing, align=args.align, names=images.names())
        return (
            dataset,
            np.asarray(images.index.labels, dtype=np.int64),
            None,
            f"shards {args.shards} split {args.split}",
        )
    if args.pairs:
        paths, identities, index_a, index_b, same = pair_images(args.pairs, args.folder)
        pairs = (index_a, index_b, same)
        description = f"pairs {shown_path(args.pairs)} (images {shown_path(args.folder)})"
    else:
        paths, identities = list_images(args.folder)
        loose = [p for p, identity in zip(paths, identities) if not identity]
        if loose:
            raise ImageError(
                f"--folder {args.folder}: {loose[0]} is not inside an identity folder (DIR/<identity>/<image>)"
            )
        pairs, description = None, f"folder {shown_path(args.folder)}"
    labels = np.unique(np.array(identities), return_inverse=True)[1].astype(np.int64)
    dataset = ImageDataset(paths, preprocessing, align=args.align, names=paths, min_size=args.min_size)
    return dataset, labels, pairs, description


def _keep_pairs(pairs, kept: np.ndarray, total: int):
    """Re-index pairs to the embedded images; pairs with a skipped image (no face) are dropped."""
    if pairs is None:
        return None
    row_of = np.full(total, -1)
    row_of[kept] = np.arange(len(kept))
    a, b, same = row_of[pairs[0]], row_of[pairs[1]], pairs[2]
    valid = (a >= 0) & (b >= 0)
    return a[valid], b[valid], same[valid]


def evaluate_bins(args: argparse.Namespace, device) -> dict | None:
    """--bin: every set embedded across ranks; the main rank writes each set's report. Returns {set: metrics}."""
    from facedist.evaluation import bins

    model, preprocessing, _ = load_embedding_model(args.checkpoint, device)
    results = {}
    for path in args.bin:
        bin_set = bins.load_set(path)
        metrics, embeddings = bins.evaluate_set(
            model, bin_set, preprocessing, args.batch_size, args.num_workers, progress=True
        )
        if distributed.rank() == 0:
            bins.write_set_report(args.out, bin_set, metrics, embeddings)
            print(
                f"facedist-eval: {bin_set.name}: accuracy {metrics['accuracy']:.4f} +- {metrics['accuracy_std']:.4f} "
                f"({metrics['num_pairs']} pairs, 10 folds), AUC {metrics['auc']:.4f}, EER {metrics['eer']:.4f}"
            )
        results[bin_set.name] = metrics
    return results if distributed.rank() == 0 else None


def evaluate_ijb(args: argparse.Namespace, device) -> dict | None:
    """--ijb: faces and pairs split across ranks; the main rank writes the report."""
    from facedist.evaluation.ijb import evaluate_ijb as run

    model, preprocessing, _ = load_embedding_model(args.checkpoint, device)
    metrics = run(
        args.ijb, args.ijb_name, model, preprocessing, args.out, args.batch_size, args.num_workers, progress=True
    )
    if distributed.rank() != 0:
        return None
    published, own = metrics["tar_at_far_published"], metrics["tar_at_far_facedist"]
    print(
        f"facedist-eval: {metrics['name']}: {metrics['num_templates']} templates, {metrics['num_genuine']} + "
        f"{metrics['num_impostor']} pairs; TAR@FAR (published rule / facedist rule): "
        + ", ".join(
            f"{far}: {published[far]:.4f} / {'-' if own[far] is None else f'{own[far]:.4f}'}" for far in published
        )
    )
    if metrics["faces_detected_for_missing_landmarks"]:
        print(
            f"facedist-eval: {metrics['faces_detected_for_missing_landmarks']} faces without landmarks detected; "
            f"{len(metrics['faces_left_out'])} with no face found left out (listed in {args.out}/metrics.json)"
        )
    return metrics


def evaluate(args: argparse.Namespace, device) -> dict | None:
    """Embed on every rank; on the main rank make the report and store thresholds. Returns the metrics there."""
    from facedist.evaluation.report import evaluate_embeddings, summary_line

    model, preprocessing, checkpoint_dir = load_embedding_model(args.checkpoint, device)
    dataset, labels, pairs, description = _dataset(args, preprocessing)
    flip = flip_default(args.flip, preprocessing)
    result = embed_dataset(model, dataset, args.batch_size, flip, args.num_workers, progress=True, skip_unusable=True)
    if distributed.rank() != 0:
        return None
    out = Path(args.out)
    skipped = account_for_skipped(result.skipped, dataset.names, out / SKIPPED_FILE, args.strict)
    out.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as writer:
        metrics = evaluate_embeddings(
            result.vectors,
            labels[result.indices],
            out_dir=out,
            tb_writer=writer,
            pairs=_keep_pairs(pairs, result.indices, len(dataset)),
            tsne=args.tsne,
        )
    thresholds = write_thresholds(checkpoint_dir, metrics, description, flip, args.align)
    print(f"facedist-eval: {description}: {summary_line(metrics)}")
    print(
        f"facedist-eval: {len(result.indices)} images embedded, {skipped}; report in {out}, thresholds in {thresholds}"
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from accelerate import PartialState

    state = PartialState(cpu=args.cpu)  # joins the process group when run under accelerate launch
    try:
        if args.align:
            require_aligner()
        (evaluate_bins if args.bin else evaluate_ijb if args.ijb else evaluate)(args, state.device)
    except (CheckpointError, ImageError, ShardError, PairsError, ValueError, AlignerMissingError) as err:
        # ValueError: unusable data
        raise SystemExit(f"facedist-eval: {err}") from None
    finally:
        distributed.barrier()
        state.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
