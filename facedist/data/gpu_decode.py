"""`data.decode=gpu`: the workers only read; the batch's JPEGs are decoded on the GPU with nvJPEG
(`torchvision.io.decode_jpeg` on a list, device="cuda") and warped there with the CPU path's own affine
maps (`affine_grid` + `grid_sample`, bilinear, replicated border), so the CPU does no pixel work.

torchvision.io cannot load with a CPU torch and a CUDA torchvision (the machines without GPUs here), so
it is imported only when a batch is decoded; `use_gpu_decode` says in one line why it falls back to the
CPU path instead (no CUDA, shards not JPEG, torchvision.io not loadable). The two paths are not
bit-identical (different IDCT and resampling code); each alone is deterministic.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from facedist.data.shards import ShardError


def _unavailable(image_format: str) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if image_format != "jpg":
        return f"the shards are {image_format}, nvJPEG decodes JPEG only"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as err:  # noqa: BLE001  (any import failure means: not here)
        return f"torchvision.io does not load ({type(err).__name__}: {err})"
    return None


def use_gpu_decode(image_format: str) -> bool:
    """True when `data.decode=gpu` can run here; else prints why (one line) and the CPU path is used."""
    reason = _unavailable(image_format)
    if reason is not None:
        print(f"facedist: data.decode=gpu: {reason}; decoding on the CPU", file=sys.stderr)
    return reason is None


def warp_batch(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] through each item's theta (augment.grid_theta) -> uint8 [B, 3, size, size]."""
    grid = F.affine_grid(theta.to(images.device), [len(images), 3, size, size], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def decode_batch(encoded: list[torch.Tensor], samples: list[int], sample_name, device) -> torch.Tensor:
    """nvJPEG decode of a batch -> uint8 [B, 3, H, W] on `device`; a bad image -> ShardError naming it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return torch.stack(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # nvJPEG says a batch failed, not which image: find it
        for data, sample in zip(encoded, samples):
            try:
                decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as err:
                raise ShardError(f"{sample_name(sample)}: corrupt JPEG (nvJPEG: {str(err).splitlines()[0]})") from None
        raise
