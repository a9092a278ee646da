"""flowkit.data: digits splits, the MNIST path on IDX files written here, missing-file errors."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flowkit.data import DATASETS, DatasetInfo, DatasetNotFoundError, ImageDataset, dataset_info, load_splits

MNIST_SUBSET = Path("/work/shared/data/mnist_subset.npz")


def _digit_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real MNIST digits from the shared subset, or synthetic 28x28 uint8 images."""
    if MNIST_SUBSET.is_file():
        data = np.load(MNIST_SUBSET)
        return data["images"][:n].copy(), data["labels"][:n].astype(np.uint8)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """IDX (LeCun's MNIST format): magic 0x0000 08 <ndim>, big-endian int32 dims, uint8 data."""
    assert array.dtype == np.uint8
    payload = (
        struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    )
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_mnist(root: Path, folder: str, n_train: int, n_test: int, compress: bool = True):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    images, labels = _digit_images(n_train + n_test)
    parts = {"train": (images[:n_train], labels[:n_train]), "t10k": (images[n_train:], labels[n_train:])}
    for prefix, (x, y) in parts.items():
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x, compress)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y, compress)
    return parts


def _check_items(ds: ImageDataset, shape, num_levels):
    for i in (0, len(ds) - 1):
        image, label = ds[i]
        assert isinstance(image, torch.Tensor) and image.dtype == torch.long and tuple(image.shape) == shape
        assert isinstance(label, int)
        assert 0 <= int(image.min()) and int(image.max()) < num_levels
    assert ds.images.dtype == torch.uint8 and int(ds.images.max()) < num_levels


# -- info -----------------------------------------------------------------------------------


def test_dataset_info():
    assert DATASETS == ("digits", "mnist", "fashion-mnist", "cifar10")
    assert dataset_info("digits") == DatasetInfo((1, 8, 8), 17)
    assert dataset_info("mnist") == DatasetInfo((1, 28, 28), 256)
    assert dataset_info("fashion-mnist") == DatasetInfo((1, 28, 28), 256)
    assert dataset_info("cifar10") == DatasetInfo((3, 32, 32), 256)
    with pytest.raises(ValueError, match="name"):
        dataset_info("svhn")
    with pytest.raises(ValueError, match="name"):
        load_splits("svhn")


# -- digits ---------------------------------------------------------------------------------


def test_digits_splits_are_disjoint_integer_in_range_and_match_sklearn():
    from sklearn.datasets import load_digits

    splits = load_splits("digits", seed=0)
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 1258, "val": 180, "test": 359}  # ~70/10/20 of 1797
    idx = [set(splits[k].indices.tolist()) for k in ("train", "val", "test")]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert set().union(*idx) == set(range(1797))
    source = load_digits()
    for ds in splits.values():
        _check_items(ds, (1, 8, 8), 17)
        np.testing.assert_array_equal(ds.images.numpy()[:, 0], source.images[ds.indices.numpy()].astype(np.uint8))
        np.testing.assert_array_equal(ds.labels.numpy(), source.target[ds.indices.numpy()])
    assert int(splits["train"].images.max()) == 16


def test_digits_splits_are_deterministic_and_the_test_split_is_fixed():
    a, b, c = load_splits("digits", seed=0), load_splits("digits", seed=0), load_splits("digits", seed=1)
    for k in ("train", "val", "test"):
        assert torch.equal(a[k].indices, b[k].indices) and torch.equal(a[k].images, b[k].images)
    assert torch.equal(a["test"].indices, c["test"].indices), "the test split must not depend on the seed"
    assert not torch.equal(a["val"].indices, c["val"].indices)


def test_val_size_options():
    assert len(load_splits("digits", val_size=100)["val"]) == 100
    assert len(load_splits("digits", val_size=0.5)["val"]) == 719  # half of the 1438 non-test digits
    for bad in (-1, 1.5, 5000, "10"):
        with pytest.raises(ValueError, match="val_size"):
            load_splits("digits", val_size=bad)


# -- MNIST through torchvision, on IDX files written here ----------------------------------------


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
@pytest.mark.parametrize("compress", [True, False], ids=["gz", "unpacked"])
def test_mnist_path_reads_idx_files(tmp_path, name, folder, compress):
    parts = _write_mnist(tmp_path, folder, n_train=30, n_test=10, compress=compress)
    splits = load_splits(name, root=tmp_path, val_size=6, seed=3, download=False)
    assert {k: len(v) for k, v in splits.items()} == {"train": 24, "val": 6, "test": 10}
    for k in ("train", "val", "test"):
        _check_items(splits[k], (1, 28, 28), 256)
    x_train, y_train = parts["train"]
    for k in ("train", "val"):
        ds = splits[k]
        np.testing.assert_array_equal(ds.images[:, 0].numpy(), x_train[ds.indices.numpy()])
        np.testing.assert_array_equal(ds.labels.numpy(), y_train[ds.indices.numpy()])
    assert sorted(splits["train"].indices.tolist() + splits["val"].indices.tolist()) == list(range(30))
    x_test, y_test = parts["t10k"]
    np.testing.assert_array_equal(splits["test"].images[:, 0].numpy(), x_test)
    np.testing.assert_array_equal(splits["test"].labels.numpy(), y_test)
    image, label = splits["test"][4]
    assert torch.equal(image, torch.as_tensor(x_test[4]).long().unsqueeze(0)) and label == int(y_test[4])
    # same seed, same split
    again = load_splits(name, root=tmp_path, val_size=6, seed=3, download=False)
    assert torch.equal(again["val"].indices, splits["val"].indices)


def test_missing_mnist_files_say_where_to_put_them(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_splits("mnist", root=tmp_path, download=False)
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in msg
    for f in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        assert f in msg
    assert "download=False" in msg and "https://" in msg


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def no_internet(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no route to host")

    monkeypatch.setattr(tvd.MNIST, "download", no_internet)
    with pytest.raises(DatasetNotFoundError) as info:
        load_splits("mnist", root=tmp_path, download=True)
    msg = str(info.value)
    assert "downloading it failed" in msg and "no route to host" in msg
    assert str(tmp_path / "MNIST" / "raw") in msg


def test_missing_cifar10_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_splits("cifar10", root=tmp_path, download=False)
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "cifar-10-python.tar.gz" in msg


def test_cifar10_path_gives_channels_first(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    # our files have other md5s than the real ones: skip torchvision's checksum checks
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.CIFAR10, "_load_meta", lambda self: None)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)  # CIFAR rows: R plane, G plane, B plane
        labels = rng.integers(0, 10, 4).tolist()
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)

    splits = load_splits("cifar10", root=tmp_path, val_size=5, download=False)
    assert {k: len(v) for k, v in splits.items()} == {"train": 15, "val": 5, "test": 4}
    _check_items(splits["test"], (3, 32, 32), 256)
    data, labels = batches["test_batch"]
    np.testing.assert_array_equal(splits["test"].images.numpy(), data.reshape(4, 3, 32, 32))
    assert splits["test"].labels.tolist() == labels
    train_data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(20, 3, 32, 32)
    ds = splits["train"]
    np.testing.assert_array_equal(ds.images.numpy(), train_data[ds.indices.numpy()])


def test_loader_works_in_a_data_loader():
    ds = load_splits("digits")["val"]
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.long and y.dtype == torch.long


def test_a_dataset_checks_its_pixel_values_once_when_it_is_made():
    images = torch.randint(0, 17, (6, 1, 8, 8), dtype=torch.uint8)
    ds = ImageDataset(images.clone(), torch.zeros(6, dtype=torch.long), 17)
    images[2, 0, 3, 3] = 17
    with pytest.raises(ValueError, match=r"images: values must lie in \[0, 17\).*max 17"):
        ImageDataset(images, torch.zeros(6, dtype=torch.long), 17)
    with pytest.raises(TypeError, match="images: expected integer images"):
        ImageDataset(images.float(), torch.zeros(6, dtype=torch.long), 17)
    with pytest.raises(TypeError, match="num_levels"):
        ImageDataset(ds.images, ds.labels, 17.0)
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(ds.images, torch.zeros(5, dtype=torch.long), 17)


def test_a_list_of_indices_is_a_whole_batch():
    ds = load_splits("digits")["val"]
    for rows in ([3, 0, 7], torch.tensor([3, 0, 7])):
        images, labels = ds[rows]
        assert images.dtype == torch.long and images.shape == (3, 1, 8, 8)
        assert torch.equal(images, torch.stack([ds[i][0] for i in (3, 0, 7)]))
        assert labels.tolist() == [ds[i][1] for i in (3, 0, 7)]
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(ds), 16, drop_last=False)
    x, y = next(iter(torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None)))
    assert x.shape == (16, 1, 8, 8) and torch.equal(x, ds.images[:16].long()) and y.shape == (16,)
