"""Batch samplers, one global batch per step split across W ranks: `ClassBalancedBatchSampler` (P identities
x M images per rank, for pair losses) and `RandomBatchSampler` (images drawn uniformly, for margin heads).

Written here because pytorch-metric-learning's MPerClassSampler is not DDP-aware: it neither splits a
global batch across ranks nor keeps identities disjoint between them, and it cannot resume mid-epoch.

Design (scales to 100k+ identities and data larger than RAM):
- The only input is `class_offsets` (C + 1 integers from the shard index: class c owns sample rows
  offsets[c]:offsets[c+1]); nothing per sample is held in memory.
- The GLOBAL batch of step s is a pure function of (seed, s, G = W x P): epoch e = s // (C // G); the
  epoch's identity order is a permutation drawn from (seed, e) (cached, O(C) per epoch); step s of the
  epoch takes identities [k*G, (k+1)*G) of it, so within a step all identities are distinct; the M
  images of identity c are drawn from (seed, e, c): without replacement when c has >= M images, with
  replacement otherwise (stated, so small identities still fill their M slots).
- Rank r takes identities [r*P, (r+1)*P) of the global batch: any W with the same W x P sees the same
  global batch, and every rank gets the same number of steps (an endless stream; no epoch-end hang).
- Each item is (sample_index, aug_seed); aug_seed is drawn from (seed, s, position in the global batch),
  so augmentation does not depend on W, rank or DataLoader workers, and repeated images get new views.
- Resuming needs only the step: `start_step` = number of batches training consumed (not prefetched).

RandomBatchSampler: epoch e visits every image once in an order keyed by (seed, e); step s of the epoch
takes positions [k*G, (k+1)*G) of it (G = W x data.batch_size), rank r the slice [r*B, (r+1)*B). The order
is a keyed bijection over [0, N) (a Feistel network on the next even power of two, cycle-walked back into
[0, N)), evaluated only at the positions of a step: a materialised permutation of WebFace42M's 42M images
would cost 336 MB per rank; this costs O(G). Written here because numpy and torch only materialise.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

_AUG_STREAM, _IMAGE_STREAM, _EPOCH_STREAM, _ORDER_STREAM = 0, 1, 2, 3
_FEISTEL_ROUNDS = 4


class _StepSampler:
    """An endless (or max_steps-long) stream of `batch(step)` from start_step; keyed augmentation seeds."""

    start_step: int
    max_steps: int | None
    seed: int

    def batch(self, step: int) -> list[tuple[int, int]]:
        raise NotImplementedError

    def _aug_seeds(self, step: int, global_size: int, start: int, stop: int) -> np.ndarray:
        # one draw for the whole global batch, then this rank's slice: independent of W for a fixed global batch
        return np.random.default_rng([self.seed, _AUG_STREAM, step]).integers(
            0, 2**63 - 1, global_size, dtype=np.int64
        )[start:stop]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.max_steps is None or step < self.max_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("an endless sampler has no length (pass max_steps)")
        return max(0, self.max_steps - self.start_step)


def _check_common(world_size: int, rank: int, seed: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if seed < 0:
        raise ValueError(f"train.seed={seed} must be >= 0 (it seeds numpy SeedSequences)")


class ClassBalancedBatchSampler(_StepSampler):
    """Yields, for steps start_step, start_step + 1, ..., this rank's list of P*M (sample_index, aug_seed)."""

    def __init__(
        self,
        class_offsets,
        classes_per_batch: int,
        images_per_class: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        start_step: int = 0,
        max_steps: int | None = None,
    ):
        self.class_offsets = np.asarray(class_offsets, dtype=np.int64)
        self.num_classes = len(self.class_offsets) - 1
        self.P, self.M, self.world_size, self.rank = classes_per_batch, images_per_class, world_size, rank
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps
        self.global_classes = world_size * classes_per_batch
        if min(classes_per_batch, images_per_class, world_size) < 1:
            raise ValueError(
                f"data: classes_per_batch={classes_per_batch}, images_per_class={images_per_class} and "
                f"world_size={world_size} must all be >= 1"
            )
        _check_common(world_size, rank, seed)
        if self.num_classes < self.global_classes:
            raise ValueError(
                f"data: {self.num_classes} identities cannot fill a global batch of "
                f"{world_size} processes x data.classes_per_batch={classes_per_batch} distinct identities"
            )
        if np.any(np.diff(self.class_offsets) < 1):
            empty = int(np.argmax(np.diff(self.class_offsets) < 1))
            raise ValueError(f"data: identity {empty} has no images")
        self.steps_per_epoch = self.num_classes // self.global_classes
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, _EPOCH_STREAM, epoch]).permutation(self.num_classes)
            self._epoch = epoch
        return self._order

    def global_classes_at(self, step: int) -> np.ndarray:
        """The W*P distinct identities of the global batch at `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._epoch_order(epoch)[k * self.global_classes : (k + 1) * self.global_classes]

    def _images(self, epoch: int, cls: int) -> np.ndarray:
        start, count = int(self.class_offsets[cls]), int(self.class_offsets[cls + 1] - self.class_offsets[cls])
        rng = np.random.default_rng([self.seed, _IMAGE_STREAM, epoch, cls])
        picks = rng.choice(count, self.M, replace=False) if count >= self.M else rng.integers(0, count, self.M)
        return start + picks

    def batch(self, step: int) -> list[tuple[int, int]]:
        """This rank's items at `step`, identity-major (P identities, M images each)."""
        classes = self.global_classes_at(step)[self.rank * self.P : (self.rank + 1) * self.P]
        epoch = step // self.steps_per_epoch
        samples = np.concatenate([self._images(epoch, int(c)) for c in classes])
        mine = self._aug_seeds(
            step, self.global_classes * self.M, self.rank * self.P * self.M, (self.rank + 1) * self.P * self.M
        )
        return [(int(s), int(a)) for s, a in zip(samples, mine)]


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser of x ^ key (uint64, wrapping): the Feistel round function."""
    x = x ^ key
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class KeyedPermutation:
    """A bijection of [0, n) keyed by `keys`, evaluated at any positions without materialising it."""

    def __init__(self, n: int, keys: np.ndarray):
        self.n, self.keys = n, np.asarray(keys, dtype=np.uint64)
        self.half = max(1, (max(1, n - 1).bit_length() + 1) // 2)  # 2 * half bits cover [0, n)
        self.mask = np.uint64((1 << self.half) - 1)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right, key) & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = self._feistel(np.asarray(positions, dtype=np.uint64))
        outside = x >= self.n
        while outside.any():  # cycle-walking: a bijection of [0, 4n) restricted to [0, n) stays one
            x[outside] = self._feistel(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)


class RandomBatchSampler(_StepSampler):
    """Yields, for steps start_step, ..., this rank's `batch_size` (sample_index, aug_seed): images drawn
    uniformly without replacement within an epoch, the global batch of a step a function of (seed, step, G)."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        start_step: int = 0,
        max_steps: int | None = None,
    ):
        _check_common(world_size, rank, seed)
        self.num_samples, self.batch_size, self.world_size, self.rank = int(num_samples), batch_size, world_size, rank
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps
        self.global_batch = world_size * batch_size
        if batch_size < 1 or self.num_samples < self.global_batch:
            raise ValueError(
                f"data: {self.num_samples} images cannot fill a global batch of {world_size} processes x "
                f"data.batch_size={batch_size}"
            )
        self.steps_per_epoch = self.num_samples // self.global_batch  # the last partial batch is dropped
        self._epoch, self._order = -1, None

    def epoch_order(self, epoch: int) -> KeyedPermutation:
        if epoch != self._epoch:
            keys = np.random.default_rng([self.seed, _ORDER_STREAM, epoch]).integers(
                0, 2**63, _FEISTEL_ROUNDS, dtype=np.uint64
            )
            self._epoch, self._order = epoch, KeyedPermutation(self.num_samples, keys)
        return self._order

    def batch(self, step: int) -> list[tuple[int, int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch + self.rank * self.batch_size
        samples = self.epoch_order(epoch)(np.arange(start, start + self.batch_size))
        mine = self._aug_seeds(step, self.global_batch, self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return [(int(s), int(a)) for s, a in zip(samples, mine)]


def make_batch_sampler(index, cfg, world_size: int, rank: int, seed: int, start_step: int = 0) -> _StepSampler:
    """`cfg.sampler` (a DataConfig) over a ShardIndex: class_balanced (P x M) or random (data.batch_size)."""
    if cfg.sampler == "random":
        return RandomBatchSampler(index.num_samples, cfg.batch_size, world_size, rank, seed, start_step)
    return ClassBalancedBatchSampler(
        index.class_offsets, cfg.classes_per_batch, cfg.images_per_class, world_size, rank, seed, start_step
    )
