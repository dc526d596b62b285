"""Command lines for using a trained model: `facedist-compare`, `facedist-embed`, `facedist-export`.

    facedist-compare --checkpoint CKPT IMG1 IMG2 [--threshold T | --far 1e-3] [--align]
    facedist-embed   --checkpoint CKPT --folder DIR --out FILE.parquet|FILE.npz [--align] [--[no-]flip] [--strict]
    facedist-export  --checkpoint CKPT --onnx model.onnx --safetensors model.safetensors

CKPT is a checkpoint directory, a training output_dir (its latest checkpoint) or a model.safetensors.
facedist-embed writes every image it can embed and lists the others with their reason in
`FILE.skipped.json` (`--strict`: exit 1 and write nothing instead). File names that are not UTF-8 are
kept byte for byte: the rule for `path` and `path_bytes` is in facedist.inference's docstring.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from facedist import distributed
from facedist.align import AlignerMissingError, require_aligner
from facedist.checkpoint import (
    EMBEDDING_FILE,
    CheckpointError,
    load_embedding_model,
    read_embedding_metadata,
    save_embedding_model,
)
from facedist.cli_common import DefaultsHelpFormatter, add_embedding_options
from facedist.durable import write_atomic
from facedist.evaluation.cli import THRESHOLDS_FILE
from facedist.evaluation.metrics import far_key
from facedist.inference import (
    ImageError,
    account_for_skipped,
    embed_paths,
    flip_default,
    list_images,
    shown_path,
)

EMBEDDING_FORMATS = (".parquet", ".npz")
PREFERRED_FAR = 1e-3  # compare's threshold when the evaluation resolved it


def _run(prog: str, command, args: argparse.Namespace) -> int:
    """Run a command; bad input ends it with one line `prog: what is wrong` and exit status 1."""
    try:
        if getattr(args, "align", False):
            require_aligner()
        command(args)
    except (CheckpointError, ImageError, FileNotFoundError, AlignerMissingError) as err:
        raise SystemExit(f"{prog}: {err}") from None
    return 0


def _device(cpu: bool) -> torch.device:
    from accelerate import PartialState

    return PartialState(cpu=cpu).device  # joins the process group under accelerate launch


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser whose --help shows defaults, with the --checkpoint every command takes."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=DefaultsHelpFormatter)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint dir, training output_dir (its latest checkpoint) or model.safetensors",
    )
    return parser


# facedist-compare


def stored_threshold(checkpoint_dir: Path, far: float | None) -> tuple[float, dict, str]:
    """The cosine threshold that facedist-eval stored next to the checkpoint at `far` (None: PREFERRED_FAR
    when stored, else the smallest FAR stored), that record and the FAR's key."""
    path = checkpoint_dir / THRESHOLDS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"no --threshold given and {path} does not exist "
            "(run facedist-eval on this checkpoint, or pass --threshold)"
        )
    record = json.loads(path.read_text())
    stored = record["far"]
    if far is None and stored:
        key = far_key(PREFERRED_FAR) if far_key(PREFERRED_FAR) in stored else min(stored, key=float)
    else:
        key = far_key(far if far is not None else PREFERRED_FAR)
    if key not in stored:
        raise CheckpointError(
            f"{path}: no threshold at FAR {key} (available: {', '.join(stored) or 'none'}; "
            "evaluate on more images or pass --threshold)"
        )
    return float(stored[key]), record, key


def compare(args: argparse.Namespace) -> None:
    model, preprocessing, checkpoint_dir = load_embedding_model(args.checkpoint, _device(args.cpu))
    flip = flip_default(args.flip, preprocessing)
    if args.threshold is None:
        threshold, record, key = stored_threshold(checkpoint_dir, args.far)
        if args.flip is None:  # the threshold holds for embeddings made the way it was measured
            flip = record.get("flip", flip)
        source = f"FAR {key} from {checkpoint_dir / THRESHOLDS_FILE}"
    else:
        threshold, source = args.threshold, "--threshold"
    images = [args.image1, args.image2]
    result = embed_paths(model, images, preprocessing, flip=flip, align=args.align, min_size=args.min_size)
    if result.skipped:
        raise ImageError(str(result.skipped[0]))
    similarity = float(result.vectors[0] @ result.vectors[1])
    verdict = "same person" if similarity >= threshold else "different people"
    print(f"cosine similarity {similarity:.4f}, threshold {threshold:.4f} ({source}): {verdict}")


def compare_parser() -> argparse.ArgumentParser:
    parser = _parser("facedist-compare", "Are two face images the same person?")
    parser.add_argument("image1", help="first face image")
    parser.add_argument("image2", help="second face image")
    parser.add_argument("--threshold", type=float, help="cosine threshold (default: the stored threshold at --far)")
    parser.add_argument(
        "--far",
        type=float,
        help=f"false accept rate of the threshold facedist-eval stored (default: {PREFERRED_FAR:.0e} where the "
        "evaluation had impostor pairs enough to resolve it, else the smallest FAR it resolved)",
    )
    add_embedding_options(parser, batches=False)
    return parser


def compare_main(argv: list[str] | None = None) -> int:
    return _run("facedist-compare", compare, compare_parser().parse_args(argv))


# facedist-embed


def write_embeddings(path: Path, vectors: np.ndarray, identities: list[str], paths: list[str | Path]) -> None:
    """`.parquet`: columns path, path_bytes, identity, embedding (fixed-size float32 list); `.npz`: arrays
    embeddings, identity, path, path_bytes. Paths and identities as text, exact bytes in path_bytes
    (facedist.inference's docstring). Written atomically."""
    texts, raw = [shown_path(p) for p in paths], [os.fsencode(p) for p in paths]
    identities = [shown_path(identity) for identity in identities]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
        columns = {"path": texts, "path_bytes": pa.array(raw, pa.binary()), "identity": identities}
        table = pa.table({**columns, "embedding": embedding})
        write_atomic(path, lambda tmp: pq.write_table(table, tmp))
    else:

        def write_npz(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temp name
                arrays = {"identity": np.array(identities, dtype=str), "path": np.array(texts, dtype=str)}
                np.savez(f, embeddings=vectors, path_bytes=np.array(raw, dtype=bytes), **arrays)

        write_atomic(path, write_npz)


def skipped_report_path(out: Path) -> Path:
    """Where facedist-embed lists the images it skipped: next to its output, OUT.skipped.json."""
    return out.with_name(out.name + ".skipped.json")


def embed(args: argparse.Namespace) -> None:
    out = Path(args.out)
    model, preprocessing, _ = load_embedding_model(args.checkpoint, _device(args.cpu))
    paths, identities = list_images(args.folder)
    flip = flip_default(args.flip, preprocessing)
    result = embed_paths(
        model,
        paths,
        preprocessing,
        args.batch_size,
        flip,
        args.align,
        args.num_workers,
        progress=True,
        min_size=args.min_size,
        skip_unusable=True,
    )
    if distributed.rank() != 0:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped = account_for_skipped(result.skipped, paths, skipped_report_path(out), args.strict)
    write_embeddings(out, result.vectors, [identities[i] for i in result.indices], [paths[i] for i in result.indices])
    print(f"facedist-embed: {len(result.indices)} embeddings written to {shown_path(out)}; {skipped}")


def embed_parser() -> argparse.ArgumentParser:
    parser = _parser("facedist-embed", "Embeddings of every image in a folder tree.")
    parser.add_argument(
        "--folder",
        required=True,
        metavar="DIR",
        help="images below DIR (symbolic links followed); identity = first folder below DIR",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="FILE.parquet (columns path, path_bytes, identity, embedding) or FILE.npz (arrays path, path_bytes, "
        "identity, embeddings); path is the name as UTF-8 text (undecodable bytes as U+FFFD), path_bytes its "
        "exact bytes (os.fsdecode opens it). Skipped images are listed in FILE.skipped.json",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 and write nothing when any image cannot be embedded"
    )
    add_embedding_options(parser)
    return parser


def embed_main(argv: list[str] | None = None) -> int:
    parser = embed_parser()
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


def export_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "facedist-export",
        "Backbone + neck (evaluation weights) to ONNX and/or safetensors, preprocessing in the metadata.",
    )
    parser.add_argument("--onnx", help="output .onnx file")
    parser.add_argument("--safetensors", help="output .safetensors file (loadable with --checkpoint FILE)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version of the exported graph")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    parser = export_parser()
    args = parser.parse_args(argv)
    if not (args.onnx or args.safetensors):
        parser.error("give --onnx FILE and/or --safetensors FILE")
    return _run("facedist-export", export, args)
