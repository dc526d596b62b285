"""A loader's TrainBatch -> normalised float images on the training device: photometric augmentation
(gamma, directional shading, saturation, brightness, contrast), float conversion and normalisation on the whole batch.

The batch crosses to the device as uint8 (pinned by the loader when CUDA is there, copied non_blocking).
Every factor comes from the item's draw (facedist/data/augment.py), and every operation is elementwise
or an integer sum, each a single IEEE-exact operation per element (no fused multiply-add, no float pow:
gamma is a uint8 table), so an image's result does not depend on which batch or rank it is in.
Order: gamma (table on the uint8 input), shading (times 1 + a linear ramp across the image: a light from
one side), saturation (blend with the pixel's grey), brightness (scale), contrast (blend with the image's
mean grey, taken before shading), then one clamp to [0, 255] and normalisation, all folded
into one per-image, per-channel affine map.
The result is NCHW contiguous, as the previous pipeline gave it; a channels_last model converts it in
its first convolution.
"""

from __future__ import annotations

import torch

from facedist.data import gpu_decode
from facedist.data.augment import has_photometric
from facedist.data.dataset import FaceDataset, TrainBatch

GREY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights
CPU_CHUNK_BYTES = 2**22  # float images per pass on a CPU device: about 4 MiB (measured best at 224 px)


class DeviceAugment:
    """Callable: TrainBatch -> (images [B, 3, S, S] float32 on `device`, labels on `device`)."""

    def __init__(self, dataset: FaceDataset, device):
        self.dataset, self.device = dataset, torch.device(device)
        self.saturation = dataset.augment.saturation > 0
        self.shading = dataset.augment.shading > 0
        self.photometric = has_photometric(dataset.augment)
        prep = dataset.preprocessing
        self.mean = torch.tensor(prep["mean"], dtype=torch.float64, device=self.device)
        self.std = torch.tensor(prep["std"], dtype=torch.float64, device=self.device)
        self.grey = torch.tensor(GREY, dtype=torch.float64, device=self.device)
        # clamping to [0, 255] before normalising = clamping to these bounds after it (host floats: no sync)
        self.bounds = [(-m / d, (1 - m) / d) for m, d in zip(prep["mean"], prep["std"])]

    def __call__(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch.labels.to(self.device, non_blocking=True)
        if batch.images is not None:
            images = batch.images.to(self.device, non_blocking=True)  # [B, 3, S, S] uint8
        else:
            decoded = gpu_decode.decode_batch(
                batch.encoded, batch.samples.tolist(), self.dataset.sample_name, self.device
            )
            images = gpu_decode.warp_batch(decoded, batch.theta, self.dataset.size)
        factors = batch.photometric.to(self.device, non_blocking=True)
        tables = batch.gamma_tables.to(self.device, non_blocking=True) if batch.gamma_tables is not None else None
        return self.augment_and_normalise(images, factors, tables), labels

    def augment_and_normalise(self, images: torch.Tensor, factors: torch.Tensor, tables: torch.Tensor | None):
        """uint8 [B, 3, S, S] on the device, factors [B, 6] (Draw.photometric), gamma tables [B, 256] or None
        -> float [B, 3, S, S]."""
        count, _, height, width = images.shape
        out = torch.empty((count, 3, height, width), device=images.device)
        # on a CPU, a few images at a time keep the passes in cache (measured ~1.4x faster at 224 px);
        # every operation is per image, so the result is the same bits as one pass over the batch
        chunk = count if images.device.type != "cpu" else max(1, CPU_CHUNK_BYTES // (4 * 3 * height * width))
        for start in range(0, count, chunk):
            part = slice(start, start + chunk)
            self._augment(images[part], factors[part], tables[part] if tables is not None else None, out[part])
        return out

    def _augment(self, images: torch.Tensor, factors: torch.Tensor, tables: torch.Tensor | None, out: torch.Tensor):
        count, _, height, width = images.shape
        if tables is not None:
            images = tables.gather(1, images.reshape(count, -1).long()).to(torch.uint8).view(count, 3, height, width)
        out.copy_(images)  # to float, in place; planes: every per-channel operation runs over whole planes
        if self.photometric:  # sums of integers: exact (hence the same in any order) below 2**24 per channel in float32
            planes = out.view(count * 3, -1)
            sums = (planes.sum(1) if 255 * height * width < 2**24 else planes.double().sum(1)).view(count, 3)
        if self.shading:  # x (1 + slope_x * u + slope_y * v), (u, v) pixel centres in [-1, 1]
            u = (torch.arange(width, device=out.device) * 2 + 1) / width - 1
            v = (torch.arange(height, device=out.device) * 2 + 1) / height - 1
            ramp = factors[:, 4].view(count, 1, 1) * u.view(1, 1, width)
            ramp = ramp + factors[:, 5].view(count, 1, 1) * v.view(1, height, 1)
            ramp += 1
            out *= ramp.unsqueeze(1)
        # per image and channel: y = alpha * x + beta * grey(x) + offset; coefficients in float64 on [B, 3]
        scale = 1 / (255 * self.std)
        if self.photometric:
            brightness, contrast, saturation = factors[:, 0].double(), factors[:, 1].double(), factors[:, 2].double()
            mean_grey = (sums.double() * self.grey).sum(dim=1) / (height * width)  # saturation keeps the grey level
            gain = brightness * contrast
            alpha = (gain * saturation)[:, None] * scale
            beta = (gain * (1 - saturation))[:, None] * scale
            offset = ((1 - contrast) * brightness * mean_grey)[:, None] * scale - self.mean / self.std
        else:
            alpha, offset = scale.expand(count, 3), (-self.mean / self.std).expand(count, 3)
        grey = None
        if self.saturation:  # before `out` is scaled in place
            grey = out[:, 0] * GREY[0]
            grey += out[:, 1] * GREY[1]
            grey += out[:, 2] * GREY[2]
        out.mul_(alpha.float().view(count, 3, 1, 1))
        out.add_(offset.float().view(count, 3, 1, 1))
        for channel, (low, high) in enumerate(self.bounds):  # scalar bounds per plane: a clamp with tensor
            plane = out[:, channel]  # bounds measured 30x slower
            if grey is not None:
                plane += grey * beta[:, channel].float().view(count, 1, 1)
            if self.photometric:
                plane.clamp_(low, high)
