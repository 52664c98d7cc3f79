"""Behaviour of dynarch.data: shapes, normalisation, determinism and clear errors."""

from __future__ import annotations

import os
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import dynarch, run_dir_of

from dynarch.data import DataError, DataSplits, augment, load_data, make_loaders
from dynarch.history import HistoryReader

CIFAR_SUBSET = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-10k.npz"


def _write_npz(path: Path, **overrides: object) -> Path:
    """A small valid npz (RGB 6x6, 4 classes) with any array replaced or removed (None)."""
    rng = np.random.default_rng(0)
    arrays: dict[str, object] = {
        "x_train": rng.integers(0, 256, size=(20, 6, 6, 3), dtype=np.uint8),
        "y_train": np.arange(20, dtype=np.int64) % 3,
        "x_test": rng.integers(0, 256, size=(8, 6, 6, 3), dtype=np.uint8),
        "y_test": np.array([0, 1, 2, 3, 0, 1, 2, 3], dtype=np.int64),
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_digits_shapes_split_and_normalisation() -> None:
    splits = load_data("digits", seed=0)
    assert isinstance(splits, DataSplits)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 8)
    x_train, y_train = splits.train.tensors
    x_test, y_test = splits.test.tensors
    assert len(x_train) + len(x_test) == 1797
    assert (len(x_train), len(x_test)) == (1437, 360)
    assert x_train.shape[1:] == (1, 8, 8) and x_test.shape[1:] == (1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert abs(x_train.mean().item()) < 1e-5
    assert abs(x_train.std().item() - 1.0) < 1e-3
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())
    # Stratified: every class keeps roughly its 20 % share in the test split.
    counts = torch.bincount(y_test, minlength=10)
    assert counts.min().item() >= 35 and counts.max().item() <= 37


def test_digits_unnormalised_is_unit_range() -> None:
    splits = load_data("digits", normalize=False)
    x = torch.cat([splits.train.tensors[0], splits.test.tensors[0]])
    assert x.min().item() == 0.0 and x.max().item() == 1.0


def test_digits_split_is_deterministic_by_seed() -> None:
    a, b, c = (load_data("digits", seed=s) for s in (3, 3, 4))
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.test.tensors[1], c.test.tensors[1])


def test_digits_test_fraction() -> None:
    splits = load_data("digits", test_fraction=0.5)
    assert abs(len(splits.test) - 1797 / 2) <= 1


def test_npz_rgb_round_trip(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "rgb.npz")
    raw = np.load(path)
    splits = load_data("npz", path=str(path), normalize=False)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (4, 3, 6)
    x_train, y_train = splits.train.tensors
    assert x_train.shape == (20, 3, 6, 6) and x_train.dtype == torch.float32
    expected = torch.from_numpy(raw["x_train"]).permute(0, 3, 1, 2).float() / 255.0
    assert torch.allclose(x_train, expected)
    assert torch.equal(y_train, torch.from_numpy(raw["y_train"]))
    assert torch.equal(splits.test.tensors[1], torch.from_numpy(raw["y_test"]))


def test_npz_normalises_per_channel_with_train_stats(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "rgb.npz")
    splits = load_data("npz", path=str(path))
    x_train = splits.train.tensors[0]
    assert torch.allclose(x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x_train.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
    raw = np.load(path)["x_train"].astype(np.float64) / 255.0
    mean, std = raw.mean(axis=(0, 1, 2)), raw.std(axis=(0, 1, 2), ddof=1)
    first_test = np.load(path)["x_test"][0].astype(np.float64) / 255.0
    expected = torch.from_numpy(((first_test - mean) / std).transpose(2, 0, 1)).float()
    assert torch.allclose(splits.test.tensors[0][0], expected, atol=1e-5)


def test_npz_grayscale(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = _write_npz(
        tmp_path / "gray.npz",
        x_train=rng.integers(0, 256, size=(20, 5, 5), dtype=np.uint8),
        x_test=rng.integers(0, 256, size=(8, 5, 5), dtype=np.uint8),
    )
    splits = load_data("npz", path=str(path))
    assert (splits.in_channels, splits.image_size) == (1, 5)
    assert splits.train.tensors[0].shape == (20, 1, 5, 5)
    assert splits.test.tensors[0].shape == (8, 1, 5, 5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"y_test": None}, "has no array 'y_test'"),
        ({"x_train": None}, "has no array 'x_train'"),
        ({"x_train": np.zeros((20, 6, 6, 3), dtype=np.float32)}, "x_train has dtype float32"),
        ({"y_test": np.zeros(8, dtype=np.float64)}, "y_test has dtype float64"),
        ({"x_test": np.zeros((8, 6 * 6 * 3), dtype=np.uint8)}, "x_test has rank 2"),
        ({"y_train": np.zeros((20, 1), dtype=np.int64)}, "y_train has rank 2"),
        ({"y_train": np.zeros(19, dtype=np.int64)}, "x_train has 20 images but y_train has 19"),
        ({"x_test": np.zeros((8, 4, 4, 3), dtype=np.uint8)}, "train images are (6, 6, 3)"),
        ({"y_test": np.full(8, -1, dtype=np.int64)}, "negative label -1"),
    ],
)
def test_npz_invalid_contents(tmp_path: Path, overrides: dict, message: str) -> None:
    path = _write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DataError) as info:
        load_data("npz", path=str(path))
    text = str(info.value)
    assert message in text
    assert "bad.npz" in text
    assert "\n" not in text


def test_npz_missing_path_and_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs a path"):
        load_data("npz")
    with pytest.raises(DataError, match=r"npz file '.*nope\.npz' not found"):
        load_data("npz", path=str(tmp_path / "nope.npz"))


def test_npz_corrupt_and_truncated(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match="'garbage.npz' is corrupt or truncated"):
        load_data("npz", path=str(garbage))

    good = _write_npz(tmp_path / "good.npz")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="'truncated.npz' is corrupt or truncated"):
        load_data("npz", path=str(truncated))

    # A readable zip whose member is damaged fails while loading, not later in training.
    damaged = tmp_path / "damaged.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(damaged, "w") as dst:
        for item in src.infolist():
            payload = src.read(item)
            dst.writestr(item, payload[:40] if item.filename == "x_test.npy" else payload)
    with pytest.raises(DataError, match="'damaged.npz' is corrupt or truncated"):
        load_data("npz", path=str(damaged))


def test_cifar10_subset_npz() -> None:
    if not CIFAR_SUBSET.is_file():
        pytest.skip(f"{CIFAR_SUBSET} not present")
    splits = load_data("npz", path=str(CIFAR_SUBSET))
    assert (len(splits.train), len(splits.test)) == (10000, 2000)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 3, 32)
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    assert torch.bincount(splits.test.tensors[1]).tolist() == [200] * 10


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(DataError) as info:
        load_data("mnistt")
    text = str(info.value)
    assert "'mnistt'" in text
    for name in ("digits", "npz", "cifar10", "cifar100", "imagefolder"):
        assert name in text


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_without_download(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError) as info:
        load_data(name, root=str(tmp_path), download=False)
    text = str(info.value)
    assert text.startswith(f"{name}: cannot load from root {str(tmp_path)!r}")
    assert "\n" not in text


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, per_class in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(7, 7, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    splits = load_data("imagefolder", path=str(tmp_path))
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (2, 3, 7)
    assert (len(splits.train), len(splits.test)) == (6, 4)
    image, label = splits.test[3]
    assert image.shape == (3, 7, 7) and label == 1
    x = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)

    with pytest.raises(DataError, match="needs subfolders train/ and test/"):
        load_data("imagefolder", path=str(tmp_path / "train"))


def _digits_small() -> DataSplits:
    return load_data("digits")


def test_loaders_batch_shapes() -> None:
    splits = _digits_small()
    train, test = make_loaders(splits, batch_size=64)
    x, y = next(iter(train))
    assert x.shape == (64, 1, 8, 8) and y.shape == (64,)
    batches = list(test)
    assert len(batches) == 6 and batches[-1][0].shape == (360 - 5 * 64, 1, 8, 8)
    # The test loader keeps dataset order.
    assert torch.equal(torch.cat([b[1] for b in batches]), splits.test.tensors[1])


def test_loaders_seeded_shuffle_is_reproducible() -> None:
    splits = _digits_small()

    def epoch_labels(seed: int) -> list[torch.Tensor]:
        train, _ = make_loaders(splits, batch_size=100, seed=seed)
        return [y for _, y in train]

    first, again, other = epoch_labels(7), epoch_labels(7), epoch_labels(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # Shuffled, yet every sample appears exactly once per epoch.
    assert not torch.equal(torch.cat(first), splits.train.tensors[1])
    assert torch.equal(torch.cat(first).sort().values, splits.train.tensors[1].sort().values)


def test_loaders_reject_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size must be positive"):
        make_loaders(_digits_small(), batch_size=0)


def test_teacher_student_is_deterministic_and_uses_every_class() -> None:
    a = load_data("teacher_student", seed=0)
    b = load_data("teacher_student", seed=0)
    xa, ya = a.train.tensors
    xb, yb = b.train.tensors
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert (len(a.train), len(a.test), a.num_classes, a.in_channels) == (1600, 400, 10, 1)
    counts = torch.bincount(ya, minlength=10)
    assert counts.min() > 50  # standardised teacher logits spread the labels


def test_train_loader_resumes_mid_epoch_with_the_same_batches() -> None:
    splits = _digits_small()
    train, _ = make_loaders(splits, batch_size=100, seed=3)
    train.sampler.set_position(epoch=2)
    full = [y for _, y in train]
    train.sampler.set_position(epoch=2, skip=4 * 100)
    assert all(torch.equal(a, b) for a, (_, b) in zip(full[4:], train, strict=True))
    train.sampler.set_position(epoch=1)
    assert not torch.equal(torch.cat([y for _, y in train]), torch.cat(full))  # a new order


def test_augment_crops_and_flips_each_sample_the_same_way_every_time() -> None:
    """Every augmented sample is one of the 9 x 9 crops of its zero-padded image, flipped or
    not; the choice depends on (seed, step) only, and both flips and many offsets occur."""
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = augment(x, seed=3, step=7)
    assert torch.equal(out, augment(x, seed=3, step=7))
    assert not torch.equal(out, augment(x, seed=3, step=8))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    seen = set()
    for i in range(len(x)):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(
                out[i],
                padded[i, :, dy : dy + 8, dx : dx + 8].flip(-1)
                if flip
                else padded[i, :, dy : dy + 8, dx : dx + 8],
            )  # fmt: skip
        ]
        assert matches, i
        seen.add(matches[0])
    assert {flip for *_, flip in seen} == {False, True} and len(seen) > 30


def test_workers_and_augmentation_keep_a_run_reproducible(tmp_path: Path) -> None:
    """``data.num_workers`` changes nothing in a run, augmentation included (its random
    numbers come from (seed, step), not from the workers)."""
    runs = []
    for workers in (0, 2):
        result = dynarch(
            tmp_path, "run", "data.augment=true", f"data.num_workers={workers}", "trainer.steps=12"
        )
        assert result.returncode == 0, result.stderr
        runs.append(HistoryReader(run_dir_of(result) / "history.db").metrics())
    strip = [[{k: v for k, v in r.items() if k != "id"} for r in rows] for rows in runs]
    assert strip[0] == strip[1] and len(strip[0]) >= 1


def test_loader_workers_leave_ctrl_c_to_the_run() -> None:
    """A terminal's Ctrl-C (and a scheduler's SIGTERM) reach every process of the group; a
    worker that died of it would break the batch the run is finishing (or its evaluation)
    before the run can stop cleanly. Signal the workers as they start (a worker not yet
    ignoring them died of it: CI, 2026-11-28) and mid-epoch: every epoch still ends."""
    splits = load_data("digits", seed=0)
    train, _ = make_loaders(splits, 16, seed=0, num_workers=2)
    for _epoch in range(3):
        batches = iter(train)
        for _moment in ("starting", "mid-epoch"):
            for worker in batches._workers:
                os.kill(worker.pid, signal.SIGINT)
                os.kill(worker.pid, signal.SIGTERM)
            next(batches)
        assert sum(1 for _ in batches) == len(train) - 2
