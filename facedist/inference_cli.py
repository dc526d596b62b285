"""Command lines for using a trained model: `facedist-compare`, `facedist-embed`, `facedist-export`.

    facedist-compare --checkpoint CKPT IMG1 IMG2 [--threshold T | --far 1e-3] [--align]
    facedist-embed   --checkpoint CKPT --folder DIR --out FILE.parquet|FILE.npz [--align] [--[no-]flip]
    facedist-export  --checkpoint CKPT --onnx model.onnx --safetensors model.safetensors

CKPT is a checkpoint directory, a training output_dir (its latest checkpoint) or a model.safetensors.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from facedist import distributed
from facedist.checkpoint import (
    EMBEDDING_FILE,
    CheckpointError,
    load_embedding_model,
    read_embedding_metadata,
    save_embedding_model,
)
from facedist.durable import write_atomic
from facedist.evaluation.cli import THRESHOLDS_FILE
from facedist.evaluation.metrics import far_key
from facedist.inference import ImageError, embed_paths, flip_default, list_images

EMBEDDING_FORMATS = (".parquet", ".npz")


def _run(prog: str, command, args: argparse.Namespace) -> int:
    """Run a command; bad input ends it with one line `prog: what is wrong` and exit status 1."""
    try:
        command(args)
    except (CheckpointError, ImageError, FileNotFoundError) as err:
        raise SystemExit(f"{prog}: {err}") from None
    return 0


def _device(cpu: bool) -> torch.device:
    from accelerate import PartialState

    return PartialState(cpu=cpu).device  # joins the process group under accelerate launch


# facedist-compare


def stored_threshold(checkpoint_dir: Path, far: float) -> tuple[float, dict]:
    """The cosine threshold at `far` that facedist-eval stored next to the checkpoint, and that record."""
    path = checkpoint_dir / THRESHOLDS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"no --threshold given and {path} does not exist "
            "(run facedist-eval on this checkpoint, or pass --threshold)"
        )
    record = json.loads(path.read_text())
    key = far_key(far)
    if key not in record["far"]:
        raise CheckpointError(
            f"{path}: no threshold at FAR {key} (available: {', '.join(record['far']) or 'none'}; "
            "evaluate on more images or pass --threshold)"
        )
    return float(record["far"][key]), record


def compare(args: argparse.Namespace) -> None:
    model, preprocessing, checkpoint_dir = load_embedding_model(args.checkpoint, _device(args.cpu))
    flip = flip_default(args.flip, preprocessing)
    if args.threshold is None:
        threshold, record = stored_threshold(checkpoint_dir, args.far)
        if args.flip is None:  # the threshold holds for embeddings made the way it was measured
            flip = record.get("flip", flip)
        source = f"FAR {far_key(args.far)} from {checkpoint_dir / THRESHOLDS_FILE}"
    else:
        threshold, source = args.threshold, "--threshold"
    result = embed_paths(model, [args.image1, args.image2], preprocessing, flip=flip, align=args.align)
    if result.skipped:
        raise ImageError(result.skipped[0])
    similarity = float(result.vectors[0] @ result.vectors[1])
    verdict = "same person" if similarity >= threshold else "different people"
    print(f"cosine similarity {similarity:.4f}, threshold {threshold:.4f} ({source}): {verdict}")


def compare_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="facedist-compare", description="Are two face images the same person?")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("image1")
    parser.add_argument("image2")
    parser.add_argument("--threshold", type=float, help="cosine threshold (default: the stored FAR threshold)")
    parser.add_argument("--far", type=float, default=1e-3, help="which stored threshold to use (default 1e-3)")
    parser.add_argument("--align", action="store_true", help="detect and align the faces first (raw photos)")
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        help="flip test-time augmentation (default: as the checkpoint records, eval.flip)",
    )
    parser.add_argument("--cpu", action="store_true")
    return _run("facedist-compare", compare, parser.parse_args(argv))


# facedist-embed


def write_embeddings(path: Path, vectors: np.ndarray, identities: list[str], paths: list[str]) -> None:
    """`.parquet`: columns path, identity, embedding (fixed-size float32 list); `.npz`: arrays embeddings,
    identity, path. Written atomically."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
        table = pa.table({"path": paths, "identity": identities, "embedding": embedding})
        write_atomic(path, lambda tmp: pq.write_table(table, tmp))
    else:

        def write_npz(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temp name
                np.savez(
                    f, embeddings=vectors, identity=np.array(identities, dtype=str), path=np.array(paths, dtype=str)
                )

        write_atomic(path, write_npz)


def embed(args: argparse.Namespace) -> None:
    out = Path(args.out)
    model, preprocessing, _ = load_embedding_model(args.checkpoint, _device(args.cpu))
    paths, identities = list_images(args.folder)
    flip = flip_default(args.flip, preprocessing)
    result = embed_paths(
        model, paths, preprocessing, args.batch_size, flip, args.align, args.num_workers, progress=True
    )
    if distributed.rank() != 0:
        return
    for message in result.skipped:
        print(f"facedist-embed: skipped: {message}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_embeddings(
        out, result.vectors, [identities[i] for i in result.indices], [str(paths[i]) for i in result.indices]
    )
    print(f"facedist-embed: {len(result.indices)} embeddings written to {out}, {len(result.skipped)} images skipped")


def embed_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="facedist-embed", description="Embeddings of every image in a folder tree.")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--folder", required=True, help="images; identity = first folder below DIR")
    parser.add_argument("--out", required=True, help="FILE.parquet or FILE.npz")
    parser.add_argument("--align", action="store_true", help="detect and align faces (images without one are skipped)")
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        help="flip test-time augmentation (default: as the checkpoint records, eval.flip)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    if Path(args.out).suffix not in EMBEDDING_FORMATS:
        parser.error(f"--out {args.out}: unknown format (use {' or '.join(EMBEDDING_FORMATS)})")
    return _run("facedist-embed", embed, args)


# facedist-export


def export_onnx(model: torch.nn.Module, preprocessing: dict, metadata: dict, path: Path, opset: int = 17) -> None:
    """ONNX graph images [batch, 3, S, S] -> embeddings [batch, D] (not normalised), preprocessing and
    facedist metadata in metadata_props."""
    import onnx

    size = int(preprocessing["image_size"])
    example = torch.zeros(1, 3, size, size)

    def write(tmp):
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated; the new one needs onnxscript
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["images"],
                output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
            )
        proto = onnx.load(str(tmp))
        props = {
            "preprocessing": json.dumps(preprocessing),
            "facedist": json.dumps(metadata),
            "output": "embeddings are not normalised: L2-normalise before cosine similarity",
        }
        for key, value in props.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(tmp))

    write_atomic(path, write)


def export(args: argparse.Namespace) -> None:
    model, preprocessing, checkpoint_dir = load_embedding_model(args.checkpoint, "cpu")
    source = Path(args.checkpoint) if Path(args.checkpoint).is_file() else checkpoint_dir / EMBEDDING_FILE
    metadata = read_embedding_metadata(source)
    if args.safetensors:
        save_embedding_model(model, preprocessing, metadata["config"], args.safetensors, step=metadata.get("step"))
        print(f"facedist-export: {args.safetensors}")
    if args.onnx:
        export_onnx(
            model,
            preprocessing,
            {"config": metadata["config"], "step": metadata.get("step")},
            Path(args.onnx),
            args.opset,
        )
        print(f"facedist-export: {args.onnx}")


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="facedist-export",
        description="Backbone + neck (evaluation weights) to ONNX and/or safetensors, preprocessing in the metadata.",
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--onnx", help="output .onnx file")
    parser.add_argument("--safetensors", help="output .safetensors file (loadable with --checkpoint FILE)")
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    if not (args.onnx or args.safetensors):
        parser.error("give --onnx FILE and/or --safetensors FILE")
    return _run("facedist-export", export, args)
