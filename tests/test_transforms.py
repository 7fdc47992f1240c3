import numpy as np
import pytest
import torch

from medfold.settings.training import AugmentConfig
from medfold.training.fold import sample_weights
from medfold.training.transforms import CachedBatches, augment_batch


def _batch(n=64, size=16):
    x = torch.zeros(n, 1, size, size)
    x[:, :, :, : size // 4] = 1.0  # a bright stripe on the left
    return x


def test_each_image_gets_its_own_flip_and_the_draw_is_seeded():
    x = _batch()
    out = augment_batch(x.clone(), AugmentConfig(hflip=0.5), torch.Generator().manual_seed(0))
    flipped = out[:, 0, 0, -1] == 1.0
    assert 10 < int(flipped.sum()) < 54  # a mix, not all or none
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])
    again = augment_batch(x.clone(), AugmentConfig(hflip=0.5), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_rotation_brightness_contrast_erasing_keep_shape_and_range_and_differ_per_image():
    x = torch.rand(32, 1, 24, 24)
    cfg = AugmentConfig(rotation=15, brightness=0.2, contrast=0.2, erasing=1.0, perspective=0.5)
    out = augment_batch(x.clone(), cfg, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    erased = (out == 0).flatten(1).float().mean(1)
    assert (erased > 0.015).all()  # every image lost a rectangle of >= 2 % of its area
    assert len({round(float(v), 3) for v in (out - x).abs().mean((1, 2, 3))}) > 20


def test_batches_cover_every_row_once_per_epoch_in_a_seeded_order():
    cache = np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1).repeat(2, 2).repeat(2, 3)
    rows = np.arange(5, 45)
    loader = CachedBatches(cache, rows, batch_size=7, shuffle=True, seed=3)
    seen = [r for _, batch in loader for r in batch.tolist()]
    assert sorted(seen) == rows.tolist() and seen != rows.tolist()
    images, batch = next(iter(loader))
    assert torch.equal(images[:, 0, 0, 0], batch.to(torch.uint8))  # each image is its row's
    loader.set_epoch(1)
    assert [r for _, b in loader for r in b.tolist()] != seen
    loader.set_epoch(0)
    assert [r for _, b in loader for r in b.tolist()] == seen


def test_balanced_oversampling_equalises_classes():
    targets = np.array([0] * 90 + [1] * 10)
    weights = sample_weights(targets, "multiclass", ["a", "b"], "balanced", {})
    loader = CachedBatches(np.zeros((100, 1, 1, 1), np.uint8), np.arange(100), 100, shuffle=True, weights=weights)
    drawn = np.concatenate([next(iter(loader))[1].numpy() for loader.epoch in range(40)])
    share_b = (targets[drawn] == 1).mean()
    assert 0.45 < share_b < 0.55


def test_distributed_ranks_get_disjoint_equal_shards():
    cache = np.zeros((23, 1, 1, 1), np.uint8)
    shards = [
        CachedBatches(cache, np.arange(23), 4, shuffle=True, seed=0, rank=r, world=2).epoch_rows() for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 12
    assert set(shards[0]) | set(shards[1]) == set(range(23))


def test_target_oversampling_matches_the_asked_shares():
    targets = np.array([0] * 80 + [1] * 15 + [2] * 5)
    weights = sample_weights(targets, "multiclass", ["a", "b", "c"], "target", {"a": 0.2, "b": 0.3, "c": 0.5})
    drawn = targets[
        CachedBatches(
            np.zeros((100, 1, 1, 1), np.uint8), np.arange(100), 100, shuffle=True, weights=weights
        ).epoch_rows()
    ]
    many = np.concatenate(
        [
            targets[
                CachedBatches(
                    np.zeros((100, 1, 1, 1), np.uint8), np.arange(100), 100, shuffle=True, seed=s, weights=weights
                ).epoch_rows()
            ]
            for s in range(50)
        ]
    )
    assert len(drawn) == 100
    assert np.allclose(np.bincount(many, minlength=3) / len(many), [0.2, 0.3, 0.5], atol=0.03)


def test_class_weighted_losses_follow_chexnet_and_inverse_frequency():
    from medfold.training.fold import Criterion

    y = np.array([[1, 0], [0, 0], [0, 0], [0, 1]], dtype=np.float32)  # class 0: P=1, N=3
    bce = Criterion("multilabel", y, 2, class_weights=True, device="cpu")
    assert torch.allclose(bce.pos, torch.tensor([0.75, 0.75])) and torch.allclose(bce.neg, torch.tensor([0.25, 0.25]))
    logits = torch.zeros(4, 2)
    # at logit 0 every term costs log 2, weighted w+ for positives and w- for negatives
    expected = np.log(2) * (2 * 0.75 + 6 * 0.25) / 8
    assert float(bce(logits, torch.from_numpy(y))) == pytest.approx(expected, rel=1e-6)
    ce = Criterion("multiclass", np.array([0, 0, 0, 1]), 2, class_weights=True, device="cpu")
    assert torch.allclose(ce.weight, torch.tensor([4 / 6, 4 / 2]))
