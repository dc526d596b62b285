"""The one evaluation entry point: metrics of embeddings, written as metrics.json, plots and TensorBoard.

`evaluate_embeddings` runs 1:1 verification over all pairs (metrics.verification_metrics), best-threshold
k-fold accuracy and average precision on a balanced pair list (the given pairs, or a seeded balanced
sample: on all pairs "always different" would win), and 1:N identification. Its dict is metrics.json:
  auc, eer, tar_at_far {"1e-01".."1e-06"}, thresholds_at_far, num_genuine, num_impostor, roc, score_histogram
  accuracy_kfold {mean, std, threshold}, average_precision, pairs {source, num_pairs, num_same_pairs}
  cmc {rank1, rank5}, fnir_at_fpir {"1e-01".."1e-03"}, thresholds_at_fpir, identification {counts}
  num_images, num_identities
Files in out_dir: metrics.json, roc.png, pr.png, score_histogram.png, tsne.png (with tsne=True).
With split_across_ranks, every rank calls it with all embeddings: the all-pairs and 1:N parts are split
across the ranks (see metrics.py), the rest runs on rank 0 alone and the other ranks get None.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from facedist import distributed
from facedist.durable import write_atomic
from facedist.evaluation import plots
from facedist.evaluation.identification import FPIRS, identification_metrics
from facedist.evaluation.metrics import FARS, balanced_pairs, pair_list_metrics, pair_scores, verification_metrics

PROJECTOR_POINTS = 1000  # the projector is for looking at; TensorBoard stores it as text, ~10.8 MB per 1,000 x 512


def _scalars(metrics: dict) -> dict[str, float]:
    """The numbers worth a TensorBoard curve, flattened to 'group/key' names (None: not logged)."""
    scalars = {
        "auc": metrics["auc"],
        "eer": metrics["eer"],
        "accuracy_kfold": metrics["accuracy_kfold"]["mean"],
        "average_precision": metrics["average_precision"],
    }
    for group in ("tar_at_far", "cmc", "fnir_at_fpir"):
        scalars.update({f"{group}/{key}": value for key, value in (metrics[group] or {}).items()})
    return {name: value for name, value in scalars.items() if value is not None}


def summary_line(metrics: dict) -> str:
    """The headline numbers of `evaluate_embeddings`' metrics in one line (TAR only at resolvable FARs), led by
    the k-fold accuracy when the pairs were given (a pairs file)."""
    resolved = [far for far, threshold in metrics["thresholds_at_far"].items() if threshold is not None]
    tar = ", ".join(f"{far} {metrics['tar_at_far'][far]:.4f}" for far in resolved) or "- (too few impostor pairs)"
    rank1 = (metrics.get("cmc") or {}).get("rank1")
    given = ""
    if metrics["pairs"]["source"] == "given pairs":  # a pairs file's protocol: its accuracy is the headline
        accuracy = metrics["accuracy_kfold"]
        given = f"accuracy {accuracy['mean']:.4f} +- {accuracy['std']:.4f} ({metrics['pairs']['num_pairs']} pairs, "
        given += "10 folds in pair order); all pairs of the images: "
    return (
        given
        + f"AUC {metrics['auc']:.4f}, EER {metrics['eer']:.4f}, TAR@FAR {tar}"
        + (f", rank-1 {rank1:.4f}" if rank1 is not None else "")
        + f" ({metrics['num_images']} images, {metrics['num_identities']} identities, "
        f"{metrics['num_genuine']} genuine + {metrics['num_impostor']} impostor pairs)"
    )


def _figures(metrics: dict, pr: dict, embeddings, labels, tsne: bool, seed: int) -> dict:
    figures = {
        "roc": plots.roc_figure(metrics["roc"], metrics["tar_at_far"], metrics["num_impostor"]),
        "pr": plots.pr_figure(pr, metrics["average_precision"], metrics["pairs"]["num_pairs"]),
        "score_histogram": plots.score_histogram_figure(metrics["score_histogram"]),
    }
    if tsne:
        figures["tsne"] = plots.tsne_figure(embeddings, labels, seed=seed)
    return figures


def evaluate_embeddings(
    embeddings,
    labels,
    out_dir=None,
    tb_writer=None,
    step: int = 0,
    tsne: bool = False,
    pairs=None,
    *,
    fars=FARS,
    fpirs=FPIRS,
    chunk_size: int | None = None,
    pairs_per_side: int = 3000,
    seed: int = 0,
    gallery_per_identity: int = 1,
    distractor_fraction: float = 0.5,
    histogram_bins: int = 200,
    tag: str = "eval",
    projector_points: int = PROJECTOR_POINTS,
    split_across_ranks: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> dict | None:
    """Evaluate [N, D] embeddings (torch on any device, or numpy) of N images with identity labels [N].

    pairs: optional (index_a, index_b, same) into the embeddings, e.g. a pairs file's; the k-fold accuracy
    then uses its order as folds. out_dir: write metrics.json and the plots there. tb_writer: a
    torch.utils.tensorboard SummaryWriter for scalars, figures and the embedding projector at `step`,
    under `tag/`, the projector with a seeded subset of `projector_points` (0: none). Returns the metrics
    (module docstring; None on ranks other than 0 with split_across_ranks); chunk_size bounds memory (see
    metrics); should_stop: see metrics.py.
    """
    split = {"split_across_ranks": split_across_ranks, "should_stop": should_stop}
    metrics = verification_metrics(embeddings, labels, fars, chunk_size, histogram_bins=histogram_bins, **split)
    identification = identification_metrics(
        embeddings,
        labels,
        gallery_per_identity,
        fpirs=fpirs,
        distractor_fraction=distractor_fraction,
        seed=seed,
        chunk_size=chunk_size,
        **split,
    )
    if split_across_ranks and distributed.rank() != 0:
        return None
    if pairs is None:
        index_a, index_b, same = balanced_pairs(
            labels.cpu() if torch.is_tensor(labels) else labels, pairs_per_side, seed
        )
        source = f"balanced sample, seed {seed}"
    else:
        index_a, index_b, same = (np.asarray(p.cpu() if torch.is_tensor(p) else p) for p in pairs)
        source = "given pairs"
    pair_list = pair_list_metrics(pair_scores(embeddings, index_a, index_b), same)
    pr = pair_list.pop("pr")  # plotted, not stored: one point per pair
    metrics["accuracy_kfold"] = pair_list.pop("accuracy_kfold")
    metrics["average_precision"] = pair_list.pop("average_precision")
    metrics["pairs"] = {"source": source, **pair_list}

    for key in ("cmc", "fnir_at_fpir", "thresholds_at_fpir"):
        metrics[key] = identification.pop(key)
    metrics["identification"] = {
        **identification,
        "gallery_per_identity": gallery_per_identity,
        "distractor_fraction": distractor_fraction,
    }
    labels_cpu = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    metrics["num_images"], metrics["num_identities"] = len(labels_cpu), len(np.unique(labels_cpu))

    if out_dir is not None or tb_writer is not None:
        embeddings_cpu = (
            embeddings.detach().cpu() if torch.is_tensor(embeddings) else torch.as_tensor(embeddings)
        ).float()
        figures = _figures(metrics, pr, embeddings_cpu.numpy(), labels_cpu, tsne, seed)
        if out_dir is not None:
            _write_files(metrics, figures, Path(out_dir))
        if tb_writer is not None:
            _log_tensorboard(tb_writer, metrics, figures, embeddings_cpu, labels_cpu, step, tag, projector_points, seed)
    return metrics


def _write_files(metrics: dict, figures: dict, out_dir: Path) -> None:
    """metrics.json (atomically) and one PNG per figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1)))
    for name, figure in figures.items():
        plots.save_figure(figure, out_dir / f"{name}.png")


def _log_tensorboard(writer, metrics, figures, embeddings, labels, step, tag, projector_points, seed) -> None:
    """Scalars, figures and a seeded subset of the embeddings (the projector) under `tag/` at `step`."""
    for name, value in _scalars(metrics).items():
        writer.add_scalar(f"{tag}/{name}", value, step)
    for name, figure in figures.items():
        writer.add_figure(f"{tag}/{name}", figure, step, close=False)
    if projector_points > 0:  # the same seeded subset at every call on the same data
        keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:projector_points])
        writer.add_embedding(embeddings[keep], metadata=labels[keep].tolist(), global_step=step, tag=tag)
    writer.flush()
