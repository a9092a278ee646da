"""Image data sets as integer tensors: ``digits`` (embedded) and torchvision's MNIST family/CIFAR-10.

Every split is an :class:`ImageDataset` whose items are ``(image, label)`` with ``image`` a
``torch.long`` tensor ``[C, H, W]`` holding levels in ``[0, num_levels)`` and ``label`` an
``int``; the whole split is also available as one ``uint8`` tensor (``dataset.images``) for
fast batching, and ``dataset[indices]`` (a list or tensor of indices) gives a whole batch
``(images [B, C, H, W] long, labels [B])`` in one indexing operation.  An ``ImageDataset``
checks its pixel values once, when it is made, so a trainer can skip the per-batch check
(``model.bpd(x, validate=False)``).

* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, values 0..16, so 17
  levels), shipped inside scikit-learn -- no download, the default everywhere.  There is no
  official test split, so flowkit fixes one: 20 % of the images, chosen with a constant seed
  (the same for every ``seed``); ``seed`` only changes the train/validation split of the rest.
* ``mnist``, ``fashion-mnist`` (1x28x28, 256 levels), ``cifar10`` (3x32x32, 256 levels):
  torchvision's files under ``root``; the official test split, and a seeded train/validation
  split of the official training set.  When the files are missing and cannot be downloaded,
  :class:`DatasetNotFoundError` says which files to put in which folder.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
from pathlib import Path

import torch
from torch.utils.data import Dataset

from flowkit.errors import UserError
from flowkit.io import atomic_open
from flowkit.validation import check_image_batch, check_int

__all__ = ["DATASETS", "DatasetInfo", "DatasetNotFoundError", "ImageDataset", "dataset_info", "load_splits"]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")

#: the seed of the fixed digits test split (independent of ``load_splits(seed=...)``)
DIGITS_TEST_SEED = 12345
DIGITS_TEST_FRACTION = 0.2
DEFAULT_VAL_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Shape and quantisation of a data set's images, and the number of classes of its labels."""

    image_shape: tuple[int, int, int]
    num_levels: int
    num_classes: int = 10


_INFO = {
    "digits": DatasetInfo((1, 8, 8), 17, 10),
    "mnist": DatasetInfo((1, 28, 28), 256, 10),
    "fashion-mnist": DatasetInfo((1, 28, 28), 256, 10),
    "cifar10": DatasetInfo((3, 32, 32), 256, 10),
}


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A torchvision data set is not on disk and could not be downloaded."""


def _check_name(name) -> str:
    if name not in DATASETS:
        raise ValueError(f"name: expected one of {DATASETS}, got {name!r}")
    return name


def dataset_info(name: str) -> DatasetInfo:
    """``DatasetInfo(image_shape, num_levels, num_classes)`` of a data set in :data:`DATASETS`.

    Example:
        >>> dataset_info("digits")
        DatasetInfo(image_shape=(1, 8, 8), num_levels=17, num_classes=10)
    """
    return _INFO[_check_name(name)]


class ImageDataset(Dataset):
    """Integer images and labels held as tensors.

    Args:
        images: ``uint8`` (or integer) tensor ``[N, C, H, W]`` with values in ``[0, num_levels)``.
        labels: integer tensor ``[N]``.
        num_levels: number of levels per pixel.
        name: label for ``repr``.
        indices: the row of each image in its source (sklearn's digits, or the official
            training/test file), for reproducibility; default ``arange(N)``.

    Items are ``(images[i].long(), int(labels[i]))``; ``dataset[indices]`` with a list or
    tensor of indices is the batch ``(images[indices].long(), labels[indices])``.

    Raises:
        TypeError: ``images`` is not an integer tensor.
        ValueError: a wrong shape, or a pixel value outside ``[0, num_levels)`` (checked once,
            here: one pass over the images).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_levels: int,
        name: str = "",
        indices: torch.Tensor | None = None,
    ):
        check_int("num_levels", num_levels, low=1)
        check_image_batch(images, "images", num_levels)
        if not isinstance(labels, torch.Tensor) or labels.shape != images.shape[:1]:
            raise ValueError(
                f"labels: expected a tensor of shape [{images.shape[0]}], got {getattr(labels, 'shape', labels)!r}"
            )
        self.images = images
        self.labels = labels.long()
        self.num_levels = num_levels
        self.name = name
        self.indices = torch.arange(images.shape[0]) if indices is None else torch.as_tensor(indices).long()
        if self.indices.shape != self.labels.shape:
            raise ValueError(f"indices: expected shape [{images.shape[0]}], got {tuple(self.indices.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        """``(image [C, H, W], label)`` for an int; ``(images [B, C, H, W], labels [B])`` for a
        list or tensor of indices (what a ``BatchSampler`` yields)."""
        if isinstance(index, (list, tuple, torch.Tensor)):
            rows = torch.as_tensor(index, dtype=torch.long)
            return self.images[rows].long(), self.labels[rows]
        return self.images[index].long(), int(self.labels[index])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return c, h, w

    def subset(self, indices: torch.Tensor, name: str | None = None) -> ImageDataset:
        """A new dataset with the given rows (copies, so the parent can be freed)."""
        return ImageDataset(
            self.images[indices].clone(),
            self.labels[indices].clone(),
            self.num_levels,
            name or self.name,
            self.indices[indices].clone(),
        )

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, n={len(self)}, shape={self.image_shape}, num_levels={self.num_levels})"


# -- splitting ------------------------------------------------------------------------------


def _num_val(val_size, n: int) -> int:
    if val_size is None:
        k = round(DEFAULT_VAL_FRACTION * n)
    elif isinstance(val_size, float) and 0.0 < val_size < 1.0:
        k = round(val_size * n)
    elif isinstance(val_size, int) and not isinstance(val_size, bool):
        k = check_int("val_size", val_size, low=0)
    else:
        raise ValueError(f"val_size: expected None, an int count or a float fraction in (0, 1), got {val_size!r}")
    if not 0 <= k < n:
        raise ValueError(f"val_size: {val_size!r} leaves no training images out of {n}; expected fewer than {n}")
    return k


def _split_train_val(full: ImageDataset, val_size, seed: int, name: str) -> tuple[ImageDataset, ImageDataset]:
    n = len(full)
    k = _num_val(val_size, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:k].sort().values, perm[k:].sort().values
    return full.subset(train_idx, f"{name}/train"), full.subset(val_idx, f"{name}/val")


# -- loaders ------------------------------------------------------------------------------


def _load_digits() -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images).round().to(torch.uint8).view(-1, 1, 8, 8)
    return ImageDataset(images, torch.as_tensor(bunch.target), 17, "digits")


_TV = {
    # name: (torchvision class name, folder torchvision reads under root)
    "mnist": ("MNIST", "MNIST/raw"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
}


def _missing_message(name: str, root: Path, cls, reason: str) -> str:
    tv_name, folder = _TV[name]
    where = root / folder
    if name == "cifar10":
        url = f"{cls.url}"
        files = ", ".join(["batches.meta", *[f"data_batch_{i}" for i in range(1, 6)], "test_batch"])
        how = (
            f"download {url} and extract it in {root} (tar xzf {cls.filename} -C {root}), which creates "
            f"{where}/ with {files}; or put {cls.filename} itself in {root} and it will be extracted"
        )
    else:
        files = ", ".join(fn for fn, _ in cls.resources)
        how = f"put {files} (gzip'd or unpacked) in {where}/; they are at {cls.mirrors[0]}<file>" + (
            f" (or {', '.join(cls.mirrors[1:])})" if len(cls.mirrors) > 1 else ""
        )
    return (
        f"data set {name!r} ({tv_name}) is not in {where} and {reason}. To use it offline, {how}; "
        f"then call load_splits({name!r}, root={str(root)!r}). "
        "The embedded 'digits' data set needs no files."
    )


def _write_atomic_from(src_open, dest: Path) -> None:
    with atomic_open(dest) as out, src_open() as src:
        shutil.copyfileobj(src, out)


def _unpack_gz(raw: Path, cls) -> None:
    """torchvision's MNIST reads the unpacked IDX files; unpack any ``.gz`` lying next to them."""
    for filename, _ in cls.resources:
        gz = raw / filename
        dest = raw / filename[: -len(".gz")]
        if gz.is_file() and not dest.is_file():
            _write_atomic_from(lambda gz=gz: gzip.open(gz, "rb"), dest)


def _load_torchvision(name: str, root: Path, download: bool) -> tuple[ImageDataset, ImageDataset]:
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import extract_archive

    tv_name, folder = _TV[name]
    cls = getattr(tvd, tv_name)
    if name == "cifar10":
        archive = root / cls.filename
        if not (root / folder).is_dir() and archive.is_file():
            extract_archive(str(archive), str(root))
    else:
        _unpack_gz(root / folder, cls)

    def make(train: bool):
        return cls(str(root), train=train, download=False)

    try:
        sets = [make(True), make(False)]
    except (RuntimeError, FileNotFoundError, OSError) as first_error:
        if not download:
            raise DatasetNotFoundError(_missing_message(name, root, cls, "download=False")) from first_error
        try:
            root.mkdir(parents=True, exist_ok=True)
            cls(str(root), train=True, download=True)
            sets = [make(True), make(False)]
        except Exception as err:  # no internet, mirror down, bad checksum, ...
            detail = " ".join(str(err).split())
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            reason = f"downloading it failed ({type(err).__name__}: {detail})"
            raise DatasetNotFoundError(_missing_message(name, root, cls, reason)) from err

    out = []
    for ds, split in zip(sets, ("train", "test"), strict=False):
        data = torch.as_tensor(ds.data)
        # MNIST-like: [N, H, W] uint8; CIFAR-10: [N, H, W, 3] uint8 (numpy)
        images = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
        labels = torch.as_tensor(ds.targets)
        out.append(ImageDataset(images.to(torch.uint8).contiguous(), labels, 256, f"{name}/{split}"))
    return out[0], out[1]


def load_splits(
    name: str = "digits",
    root: str | os.PathLike = "data",
    val_size: int | float | None = None,
    seed: int = 0,
    download: bool = True,
) -> dict[str, ImageDataset]:
    """``{"train", "val", "test"}`` splits of a data set in :data:`DATASETS`.

    Args:
        name: ``"digits"`` (embedded), ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
        root: folder holding torchvision's files (``root/MNIST/raw``,
            ``root/FashionMNIST/raw``, ``root/cifar-10-batches-py``); unused for digits.
        val_size: validation images taken from the training data: an int count, a float
            fraction, or ``None`` for 10 %.
        seed: seed of the train/validation split (the test split never depends on it).
        download: try to download missing torchvision files.

    Returns:
        A dict of :class:`ImageDataset`; items ``(LongTensor [C, H, W], int)``.

    Raises:
        DatasetNotFoundError: (a ``FileNotFoundError``) when files are missing and cannot be
            downloaded; the message names the files and the folder to put them in.

    Example:
        >>> splits = load_splits("digits")
        >>> {k: len(v) for k, v in splits.items()}
        {'train': 1258, 'val': 180, 'test': 359}
    """
    _check_name(name)
    check_int("seed", seed)
    if name == "digits":
        full = _load_digits()
        n = len(full)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(DIGITS_TEST_SEED))
        n_test = round(DIGITS_TEST_FRACTION * n)
        test = full.subset(perm[:n_test].sort().values, "digits/test")
        rest = full.subset(perm[n_test:].sort().values, "digits")
        # default validation size: 10 % of all digits, i.e. a 70/10/20 split
        train, val = _split_train_val(
            rest, round(DEFAULT_VAL_FRACTION * n) if val_size is None else val_size, seed, "digits"
        )
        return {"train": train, "val": val, "test": test}
    train_full, test = _load_torchvision(name, Path(root), download)
    train, val = _split_train_val(train_full, val_size, seed, name)
    return {"train": train, "val": val, "test": test}
