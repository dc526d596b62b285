import tracemalloc

import numpy as np
import pytest

from facedist.data.sampler import ClassBalancedBatchSampler


def offsets(sizes):
    return np.concatenate([[0], np.cumsum(sizes)])


def take(sampler, steps):
    it = iter(sampler)
    return [next(it) for _ in range(steps)]


def global_batch(class_offsets, P, M, W, seed, step):
    return sum((ClassBalancedBatchSampler(class_offsets, P, M, W, r, seed).batch(step) for r in range(W)), [])


def label_of(class_offsets, sample):
    return int(np.searchsorted(class_offsets, sample, side="right") - 1)


SIZES = [5, 8, 3, 6, 9, 4, 7, 5, 2, 10, 6, 5, 8, 3]  # uneven, some below M


def test_balance_disjointness_and_uneven_classes():
    co = offsets(SIZES)
    P, M, W = 2, 4, 3
    for step in range(12):
        per_rank = [ClassBalancedBatchSampler(co, P, M, W, r, seed=1).batch(step) for r in range(W)]
        classes = []
        for items in per_rank:
            labels = [label_of(co, s) for s, _ in items]
            assert len(items) == P * M
            assert [labels[i * M : (i + 1) * M] == [labels[i * M]] * M for i in range(P)] == [True] * P
            classes += labels[::M]
        assert len(set(classes)) == W * P  # identities disjoint across ranks within a step
        for items in per_rank:  # without replacement when the class has >= M images
            for i in range(P):
                chunk = [s for s, _ in items[i * M : (i + 1) * M]]
                cls = label_of(co, chunk[0])
                if SIZES[cls] >= M:
                    assert len(set(chunk)) == M
                assert all(co[cls] <= s < co[cls + 1] for s in chunk)


def test_every_class_once_per_epoch():
    co = offsets(SIZES)
    sampler = ClassBalancedBatchSampler(co, 2, 2, 2, 0, seed=3)
    steps = sampler.steps_per_epoch
    assert steps == len(SIZES) // 4
    seen = [c for step in range(steps) for c in sampler.global_classes_at(step)]
    assert len(seen) == len(set(seen)) == steps * 4
    assert list(sampler.global_classes_at(steps)) != list(sampler.global_classes_at(0))  # new epoch order


def test_epoch_order_depends_only_on_seed_and_epoch():
    co = offsets(SIZES)
    small, large = ClassBalancedBatchSampler(co, 1, 2, 2, 0, seed=3), ClassBalancedBatchSampler(co, 3, 2, 2, 0, seed=3)
    for epoch in (0, 1):  # both walk the same identity order; a larger global batch covers more of it per step
        a = np.concatenate(
            [small.global_classes_at(epoch * small.steps_per_epoch + k) for k in range(small.steps_per_epoch)]
        )
        b = np.concatenate(
            [large.global_classes_at(epoch * large.steps_per_epoch + k) for k in range(large.steps_per_epoch)]
        )
        assert list(a[: len(b)]) == list(b)


def test_global_batch_depends_only_on_world_times_p():
    co = offsets(SIZES)
    for step in (0, 3, 7):
        one = global_batch(co, 4, 3, 1, 5, step)
        two = global_batch(co, 2, 3, 2, 5, step)
        four = global_batch(co, 1, 3, 4, 5, step)
        assert one == two == four  # same samples and same augmentation seeds, in the same order


def test_determinism_seed_and_augmentation_keys():
    co = offsets(SIZES)
    a = take(ClassBalancedBatchSampler(co, 2, 3, 2, 1, seed=9), 5)
    b = take(ClassBalancedBatchSampler(co, 2, 3, 2, 1, seed=9), 5)
    c = take(ClassBalancedBatchSampler(co, 2, 3, 2, 1, seed=10), 5)
    assert a == b and a != c
    seeds = [s for batch in a for _, s in batch]
    assert len(set(seeds)) == len(seeds)  # repeated images still get different views


def test_resume_from_start_step_continues_identically():
    co = offsets(SIZES)
    straight = take(ClassBalancedBatchSampler(co, 2, 3, 2, 0, seed=4), 11)
    resumed = take(ClassBalancedBatchSampler(co, 2, 3, 2, 0, seed=4, start_step=5), 6)
    assert resumed == straight[5:]
    bounded = ClassBalancedBatchSampler(co, 2, 3, 2, 0, seed=4, start_step=5, max_steps=8)
    assert len(bounded) == 3 and list(bounded) == straight[5:8]


def test_errors():
    with pytest.raises(ValueError, match="cannot fill a global batch"):
        ClassBalancedBatchSampler(offsets([3, 3, 3]), 2, 2, world_size=2, rank=0)
    with pytest.raises(ValueError, match="identity 1 has no images"):
        ClassBalancedBatchSampler(offsets([3, 0, 3, 3]), 1, 2)
    with pytest.raises(ValueError, match="images_per_class=0"):
        ClassBalancedBatchSampler(offsets([3, 3]), 1, 0)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        ClassBalancedBatchSampler(offsets([3, 3]), 1, 1, world_size=2, rank=2)
    with pytest.raises(ValueError, match="train.seed=-1"):
        ClassBalancedBatchSampler(offsets([3, 3]), 1, 1, seed=-1)


def test_scales_to_many_identities():
    co = offsets(np.full(200_000, 20))
    tracemalloc.start()
    sampler = ClassBalancedBatchSampler(co, 64, 4, 8, 3, seed=0)
    take(sampler, 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20  # the epoch permutation (O(C)) dominates; nothing per sample


# --- RandomBatchSampler: uniform over images, a keyed bijection instead of a permutation

from facedist.data.sampler import KeyedPermutation, RandomBatchSampler  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_keyed_permutation_is_a_bijection(n):
    keys = np.random.default_rng(n).integers(0, 2**63, 4, dtype=np.uint64)
    values = KeyedPermutation(n, keys)(np.arange(n))
    assert np.array_equal(np.sort(values), np.arange(n))
    if n > 8:
        assert not np.array_equal(values, np.arange(n))
        assert not np.array_equal(values, KeyedPermutation(n, keys + np.uint64(1))(np.arange(n)))


def random_global_batch(sampler_per_rank, step):
    return [item for sampler in sampler_per_rank for item in sampler.batch(step)]


def test_random_epoch_visits_every_image_once_and_epochs_differ():
    sampler = RandomBatchSampler(103, 10, world_size=2, rank=0, seed=4)
    both = [sampler, RandomBatchSampler(103, 10, world_size=2, rank=1, seed=4)]
    assert sampler.steps_per_epoch == 5  # 103 // 20: the partial last batch is dropped
    epoch0 = [s for step in range(5) for s, _ in random_global_batch(both, step)]
    epoch1 = [s for step in range(5, 10) for s, _ in random_global_batch(both, step)]
    assert len(set(epoch0)) == 100 and len(set(epoch1)) == 100 and epoch0 != epoch1


def test_random_global_batch_is_the_same_for_any_world_size():
    one = [RandomBatchSampler(500, 24, 1, 0, seed=1)]
    two = [RandomBatchSampler(500, 12, 2, r, seed=1) for r in range(2)]
    three = [RandomBatchSampler(500, 8, 3, r, seed=1) for r in range(3)]
    for step in (0, 1, 20, 21, 45):  # 20 steps per epoch: crosses epochs
        expected = random_global_batch(one, step)
        assert random_global_batch(two, step) == expected and random_global_batch(three, step) == expected
    assert random_global_batch(one, 0) != random_global_batch([RandomBatchSampler(500, 24, 1, 0, seed=2)], 0)


def test_random_resume_is_step_exact():
    full = take(RandomBatchSampler(200, 8, 2, 1, seed=3), 30)
    resumed = take(RandomBatchSampler(200, 8, 2, 1, seed=3, start_step=17), 13)
    assert resumed == full[17:]


def test_random_sampler_errors():
    with pytest.raises(ValueError, match="10 images cannot fill a global batch of 2 processes x data.batch_size=8"):
        RandomBatchSampler(10, 8, world_size=2)
    with pytest.raises(ValueError, match="rank 2"):
        RandomBatchSampler(100, 8, world_size=2, rank=2)


def test_random_sampler_memory_does_not_grow_with_the_images():
    tracemalloc.start()
    sampler = RandomBatchSampler(42_000_000, 128, 8, 5, seed=0)  # WebFace42M: a permutation would be 336 MB
    batches = take(sampler, 5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20 and all(0 <= s < 42_000_000 for batch in batches for s, _ in batch)
