"""Data sets for the grow/prune experiments, as in-memory tensors or torchvision datasets.

Every loader returns a :class:`DataSplits` so the trainer and the model builders only need
``num_classes``, ``in_channels`` and ``image_size``, whatever the source.
"""

from __future__ import annotations

import os
import signal
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from dynarch.errors import DynarchError, first_line

DATASET_NAMES = ("digits", "npz", "cifar10", "cifar100", "imagefolder", "teacher_student")

# Per-channel statistics of the CIFAR training sets, the values most papers normalise with.
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# First bytes of a zip archive (an .npz; "PK" then a record type) and of a bare .npy array.
ZIP_MAGIC = b"PK"
NPY_MAGIC = b"\x93NUMPY"

# How many training images are read to estimate ImageFolder normalisation statistics; reading
# them all would make loading a large folder as slow as an epoch.
IMAGEFOLDER_STAT_SAMPLES = 512


class DataError(DynarchError):
    """A data set that cannot be loaded; the message is one line naming the source and problem."""


@dataclass
class DataSplits:
    """Train and test sets plus the shape facts a model builder needs (``image_size`` = H = W)."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int


def load_data(
    name: str,
    *,
    path: str | None = None,
    root: str = "~/.cache/dynarch",
    download: bool = True,
    seed: int = 0,
    test_fraction: float = 0.2,
    normalize: bool = True,
) -> DataSplits:
    """Load data set ``name``; raises :class:`DataError` with one clear line when it cannot.

    ``path`` is the file (``npz``) or directory (``imagefolder``); ``root`` is where torchvision
    keeps CIFAR; ``seed`` and ``test_fraction`` only shape the ``digits`` split, which has no
    official test set.
    """
    if name == "digits":
        return _load_digits(seed=seed, test_fraction=test_fraction, normalize=normalize)
    if name == "npz":
        return _load_npz(path, normalize=normalize)
    if name in CIFAR_STATS:
        return _load_cifar(name, root=root, download=download, normalize=normalize)
    if name == "imagefolder":
        return _load_imagefolder(path, normalize=normalize)
    if name == "teacher_student":
        return _load_teacher_student(seed=seed, test_fraction=test_fraction)
    raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


class EpochShuffle(Sampler[int]):
    """A shuffle that is a pure function of (seed, epoch), and can start mid-epoch.

    A resumed run sets the epoch and the number of samples already seen and gets exactly the
    batches the uninterrupted run would have had, without reading the skipped ones.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Next iteration: epoch ``epoch``'s order, from its ``skip``-th sample on."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        # each of ``world`` processes takes every world-th sample of the same order, the tail
        # that does not divide evenly is left out (every process must take as many steps)
        order = order[: self.per_process * self.world][self.rank :: self.world]
        return iter(order[self.skip :].tolist())

    @property
    def per_process(self) -> int:
        return self.size // self.world

    def __len__(self) -> int:
        return self.per_process - self.skip


def make_loaders(
    splits: DataSplits,
    batch_size: int,
    *,
    seed: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world: int = 1,
) -> tuple[DataLoader, DataLoader]:
    """Train loader with a seeded, resumable shuffle (:class:`EpochShuffle`: a run is
    reproducible and can restart mid-epoch) and an unshuffled test one. In a run of ``world``
    processes, ``batch_size`` is the global batch: this process gets its ``1/world`` share of
    every batch, so together they see what one process would."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} processes")
    # Own generators: a DataLoader without one draws its workers' base seed from the global
    # RNG at every iter(), so evaluating (or resuming mid-epoch) would shift the random
    # numbers the training and the growth initializers get.
    train = StopSafeLoader(
        splits.train,
        batch_size=batch_size // world,
        sampler=EpochShuffle(len(splits.train), seed, rank, world),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals,
    )
    test = StopSafeLoader(
        splits.test,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals,
    )
    return train, test


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class StopSafeLoader(DataLoader):
    """A DataLoader whose workers never die of the run's stop signals: they are started with
    Ctrl-C and SIGTERM blocked (a child inherits its parent's signal mask), and unblock them
    only once they ignore them (:func:`ignore_stop_signals`), so a signal that arrives while
    a worker starts cannot kill it. The main process gets its signals once they started."""

    def __iter__(self) -> Any:
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):  # Windows
            return super().__iter__()
        before = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return super().__iter__()  # starts the workers
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


def ignore_stop_signals(_worker_id: int) -> None:
    """In a loader worker: leave Ctrl-C and SIGTERM (sent to the whole process group by a
    terminal or a scheduler) to the main process, which stops the run cleanly between steps
    and needs the workers for the batch it is on; they end with it. Signals that came while
    the worker started (blocked, see :class:`StopSafeLoader`) are dropped here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def augment(x: torch.Tensor, seed: int, step: int, padding: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation of a training batch: a random crop of the image padded
    by ``padding`` zeros, and a horizontal flip half of the time, per sample. The random
    numbers are a pure function of ``(seed, step)``, drawn on the CPU, so a resumed run and a
    loader with workers augment exactly as an uninterrupted single-process run."""
    n, _, h, w = x.shape
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    crops = padded[batch, chans, rows, cols]
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def _normalize_nchw(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise both splits per channel with the *train* statistics, so test data never leaks."""
    stats = train.to(torch.float64)
    mean = stats.mean(dim=(0, 2, 3), keepdim=True)
    std = stats.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    mean, std = mean.to(train.dtype), std.to(train.dtype)
    return (train - mean) / std, (test - mean) / std


def _load_digits(*, seed: int, test_fraction: float, normalize: bool) -> DataSplits:
    """scikit-learn's bundled 8x8 digits: tiny, offline, and enough to exercise growth/pruning."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    x_train = torch.from_numpy(np.ascontiguousarray(x_tr)).unsqueeze(1)
    x_test = torch.from_numpy(np.ascontiguousarray(x_te)).unsqueeze(1)
    if normalize:
        x_train, x_test = _normalize_nchw(x_train, x_test)
    return DataSplits(
        train=TensorDataset(x_train, torch.from_numpy(y_tr)),
        test=TensorDataset(x_test, torch.from_numpy(y_te)),
        num_classes=int(labels.max()) + 1,
        in_channels=1,
        image_size=8,
    )


def _load_teacher_student(
    *, seed: int, test_fraction: float, samples: int = 2000, teacher_seed: int = 0
) -> DataSplits:
    """Gaussian 1x8x8 images labelled by a fixed random teacher CNN: a task whose capacity
    need is known (the teacher's) and that needs no download."""
    from dynarch.models import vgg_small

    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"teacher_student: test_fraction must be in (0, 1), got {test_fraction}")
    gen = torch.Generator().manual_seed(teacher_seed)
    x = torch.randn(samples, 1, 8, 8, generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(teacher_seed)
        teacher = vgg_small(num_classes=10, in_channels=1, width=8, image_size=8).eval()
    with torch.no_grad():
        logits = teacher(x)
        # standardised per class, so the argmax spreads over all 10 classes
        y = ((logits - logits.mean(0)) / logits.std(0).clamp_min(1e-12)).argmax(dim=1)
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(samples * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return DataSplits(
        train=TensorDataset(x[train], y[train]),
        test=TensorDataset(x[test], y[test]),
        num_classes=10,
        in_channels=1,
        image_size=8,
    )


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """Read the four arrays eagerly so a truncated member fails here, not mid-training."""
    shown = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"npz file {shown!r} cannot be read: {exc.strerror or exc}") from exc
    if head == NPY_MAGIC:
        raise DataError(
            f"npz file {shown!r} is a single .npy array, not an npz archive of "
            f"{', '.join(NPZ_KEYS)} (save it with numpy.savez)"
        )
    if not head.startswith(ZIP_MAGIC):
        # np.load would try it as a pickle and advise allow_pickle, which is never the fix
        raise DataError(f"npz file {shown!r} is corrupt or truncated: not a zip archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in NPZ_KEYS:
                if key not in archive.files:
                    raise DataError(f"npz file {shown!r} has no array {key!r}")
            return {key: archive[key] for key in NPZ_KEYS}
    except DataError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(
                f"npz file {shown!r} holds object (pickled) arrays; dynarch reads only numeric "
                "arrays and never unpickles"
            ) from exc
        broken: Exception = exc
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        broken = exc
    raise DataError(f"npz file {shown!r} is corrupt or truncated: {first_line(broken)}") from broken


def _check_npz_split(shown: str, split: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Validate one split and return its images as (N, H, W, C)."""
    if x.dtype != np.uint8:
        raise DataError(f"npz file {shown!r}: x_{split} has dtype {x.dtype}, expected uint8")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(
            f"npz file {shown!r}: x_{split} has rank {x.ndim} (shape {x.shape}), "
            "expected (N,H,W,C) or (N,H,W)"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"npz file {shown!r}: y_{split} has dtype {y.dtype}, expected integers")
    if y.ndim != 1:
        raise DataError(f"npz file {shown!r}: y_{split} has rank {y.ndim}, expected 1")
    if len(x) != len(y):
        raise DataError(
            f"npz file {shown!r}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels"
        )
    if len(y) == 0:
        raise DataError(f"npz file {shown!r}: the {split} split is empty")
    if y.min() < 0:
        raise DataError(f"npz file {shown!r}: y_{split} has negative label {int(y.min())}")
    return x


def _load_npz(path: str | None, *, normalize: bool) -> DataSplits:
    """A user's own images as uint8 arrays: the offline route for CIFAR subsets and the like."""
    if path is None:
        raise DataError("dataset 'npz' needs a path to the .npz file")
    full = os.path.expanduser(path)
    shown = os.path.basename(full)
    if not os.path.isfile(full):
        raise DataError(f"npz file {path!r} not found")
    arrays = _read_npz(full)
    x_train = _check_npz_split(shown, "train", arrays["x_train"], arrays["y_train"])
    x_test = _check_npz_split(shown, "test", arrays["x_test"], arrays["y_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"npz file {shown!r}: train images are {x_train.shape[1:]} (H,W,C) "
            f"but test images are {x_test.shape[1:]}"
        )
    _, height, width, channels = x_train.shape
    if height != width:
        raise DataError(f"npz file {shown!r}: images are {height}x{width}, expected square")

    def to_tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)

    images_train, images_test = to_tensor(x_train), to_tensor(x_test)
    if normalize:
        images_train, images_test = _normalize_nchw(images_train, images_test)
    y_train = torch.from_numpy(arrays["y_train"].astype(np.int64))
    y_test = torch.from_numpy(arrays["y_test"].astype(np.int64))
    return DataSplits(
        train=TensorDataset(images_train.contiguous(), y_train),
        test=TensorDataset(images_test.contiguous(), y_test),
        num_classes=int(max(y_train.max(), y_test.max())) + 1,
        in_channels=int(channels),
        image_size=int(height),
    )


def _load_cifar(name: str, *, root: str, download: bool, normalize: bool) -> DataSplits:
    """Full CIFAR through torchvision, downloading into ``root`` on first use."""
    from torchvision import datasets, transforms

    steps: list = [transforms.ToTensor()]
    if normalize:
        mean, std = CIFAR_STATS[name]
        steps.append(transforms.Normalize(mean, std))
    transform = transforms.Compose(steps)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    full_root = os.path.expanduser(root)
    try:
        train = cls(full_root, train=True, download=download, transform=transform)
        test = cls(full_root, train=False, download=download, transform=transform)
    except (RuntimeError, OSError) as exc:  # URLError is an OSError; missing files a RuntimeError
        reason, hint = first_line(exc), "" if download else " (download=False)"
        raise DataError(f"{name}: cannot load from root {root!r}{hint}: {reason}") from exc
    return DataSplits(
        train=train,
        test=test,
        num_classes=len(train.classes),
        in_channels=3,
        image_size=32,
    )


def _load_imagefolder(path: str | None, *, normalize: bool) -> DataSplits:
    """A directory tree ``path/{train,test|val}/<class>/<image>``, read lazily from disk."""
    from torchvision import datasets, transforms

    if path is None:
        raise DataError("dataset 'imagefolder' needs a path to a directory with train/ and test/")
    full = os.path.expanduser(path)
    train_dir = os.path.join(full, "train")
    test_dir = next(
        (os.path.join(full, d) for d in ("test", "val") if os.path.isdir(os.path.join(full, d))),
        None,
    )
    if not os.path.isdir(train_dir) or test_dir is None:
        raise DataError(f"imagefolder {path!r} needs subfolders train/ and test/ (or val/)")
    try:
        raw = datasets.ImageFolder(train_dir, transform=transforms.ToTensor())
        steps: list = [transforms.ToTensor()]
        if normalize:
            mean, std = _estimate_channel_stats(raw)
            steps.append(transforms.Normalize(mean, std))
        transform = transforms.Compose(steps)
        train = datasets.ImageFolder(train_dir, transform=transform)
        test = datasets.ImageFolder(test_dir, transform=transform)
        first = raw[0][0]
    except (FileNotFoundError, OSError, RuntimeError) as exc:
        raise DataError(f"imagefolder {path!r}: {first_line(exc)}") from exc
    if test.classes != train.classes:
        raise DataError(
            f"imagefolder {path!r}: test classes {test.classes} differ from train {train.classes}"
        )
    return DataSplits(
        train=train,
        test=test,
        num_classes=len(train.classes),
        in_channels=int(first.shape[0]),
        image_size=int(first.shape[-1]),
    )


def _estimate_channel_stats(dataset: Dataset) -> tuple[list[float], list[float]]:
    """Per-channel mean/std from evenly spaced training images (deterministic, bounded cost)."""
    count = len(dataset)  # type: ignore[arg-type]
    picks = np.unique(np.linspace(0, count - 1, min(count, IMAGEFOLDER_STAT_SAMPLES)).astype(int))
    total = total_sq = None
    pixels = 0
    for index in picks:
        image = dataset[int(index)][0].to(torch.float64)
        flat = image.flatten(1)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        total_sq = (flat**2).sum(1) if total_sq is None else total_sq + (flat**2).sum(1)
        pixels += flat.shape[1]
    mean = total / pixels
    std = (total_sq / pixels - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()
