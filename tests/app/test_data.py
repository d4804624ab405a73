"""Datasets: built-ins, splits, IDX files and storage; the upload parser has test_upload_parsing.py."""

from __future__ import annotations

import gzip
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.ml.data import (
    BUILTINS,
    Dataset,
    DatasetError,
    content_hash,
    describe,
    load_builtin,
    load_idx_dir,
    load_saved,
    read_idx,
    save_dataset,
    split_dataset,
)
from app.ml.uploads import parse_upload
from tests.factories import Payload, flower_csv, npz_bytes, small_idx

MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
if not MNIST_DIR.is_dir():
    MNIST_DIR = Path("/work/shared/data/mnist")
needs_mnist = pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="MNIST test set not available")


# ------------------------------------------------------------------------------------------------ helpers


def rows_as_set(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.ascontiguousarray(x).reshape(len(x), -1)}


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    if not MNIST_DIR.is_dir():
        pytest.skip("MNIST test set not available")
    return load_builtin("builtin:mnist", mnist_dir=MNIST_DIR)


# ---------------------------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    ("ref", "shape", "n_classes", "groups"),
    [
        ("builtin:digits", (1797, 1, 8, 8), 10, None),
        ("builtin:iris", (150, 4), 3, {"sepal": [0, 1], "petal": [2, 3]}),
        ("builtin:wine", (178, 13), 3, None),
        ("builtin:breast_cancer", (569, 30), 2, None),
        ("builtin:synthetic", (2000, 20), 3, None),
    ],
)
def test_builtin_classification(ref: str, shape: tuple[int, ...], n_classes: int, groups: object) -> None:
    ds = load_builtin(ref)
    assert ds.x.shape == shape and ds.x.dtype == np.float32
    assert ds.y.shape == (shape[0],) and ds.y.dtype == np.int64
    assert ds.task == "classification"
    assert ds.classes is not None and len(ds.classes) == n_classes == ds.n_outputs
    assert set(np.unique(ds.y).tolist()) == set(range(n_classes))
    assert ds.feature_groups == groups
    assert ds.input_shape == shape[1:]
    assert np.isfinite(ds.x).all()


def test_digits_are_images_in_unit_range() -> None:
    ds = load_builtin("builtin:digits")
    assert ds.image_shape == (1, 8, 8)
    assert ds.classes == [str(i) for i in range(10)]
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0


def test_tabular_builtins_have_feature_names_and_no_image_shape() -> None:
    ds = load_builtin("builtin:iris")
    assert ds.image_shape is None
    assert ds.feature_names is not None and len(ds.feature_names) == 4
    assert ds.classes == ["setosa", "versicolor", "virginica"]


def test_synthetic_is_deterministic() -> None:
    a, b = load_builtin("builtin:synthetic"), load_builtin("builtin:synthetic")
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert content_hash(a) == content_hash(b)


def test_synthetic_regression() -> None:
    ds = load_builtin("builtin:synthetic_regression")
    assert ds.task == "regression"
    assert ds.x.shape == (1000, 10) and ds.x.dtype == np.float32
    assert ds.y.shape == (1000,) and ds.y.dtype == np.float32
    assert ds.classes is None and ds.n_outputs == 1


@needs_mnist
def test_mnist_builtin(mnist: Dataset) -> None:
    assert mnist.x.shape == (10_000, 1, 28, 28) and mnist.x.dtype == np.float32
    assert mnist.image_shape == (1, 28, 28)
    assert mnist.x.min() == 0.0 and mnist.x.max() == 1.0
    assert mnist.classes == [str(i) for i in range(10)]
    assert mnist.n_outputs == 10


def test_mnist_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="MNIST"):
        load_builtin("builtin:mnist")
    with pytest.raises(DatasetError, match="images-idx3"):
        load_builtin("builtin:mnist", mnist_dir=tmp_path)


def test_unknown_builtin() -> None:
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_builtin("builtin:cifar100")
    with pytest.raises(DatasetError):
        load_builtin("iris")


def test_builtins_listing_covers_every_loader() -> None:
    for ref in BUILTINS:
        if ref != "builtin:mnist":
            assert load_builtin(ref).name == ref.removeprefix("builtin:")


# ------------------------------------------------------------------------------------------------- splits


@needs_mnist
def test_mnist_split_sizes(mnist: Dataset) -> None:
    s = split_dataset(mnist)
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (6400, 1600, 2000)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (6400, 1600, 2000)
    assert s.x_train.shape[1:] == (1, 28, 28)


@needs_mnist
def test_test_split_is_shared_across_seeds_but_validation_is_not(mnist: Dataset) -> None:
    a = split_dataset(mnist, seed=0)
    b = split_dataset(mnist, seed=1)
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_val, b.x_val)
    again = split_dataset(mnist, seed=0)
    assert np.array_equal(a.x_val, again.x_val) and np.array_equal(a.x_train, again.x_train)


def test_splits_are_disjoint_and_cover_the_data() -> None:
    ds = load_builtin("builtin:synthetic")
    assert len(rows_as_set(ds.x)) == len(ds.x)  # rows are unique, so identity is by content
    s = split_dataset(ds, seed=3)
    train, val, test = rows_as_set(s.x_train), rows_as_set(s.x_val), rows_as_set(s.x_test)
    assert not train & val and not train & test and not val & test
    assert train | val | test == rows_as_set(ds.x)
    # labels travel with their rows
    lookup = {row.tobytes(): label for row, label in zip(ds.x, ds.y, strict=True)}
    assert all(lookup[row.tobytes()] == label for row, label in zip(s.x_val, s.y_val, strict=True))


def test_stratification_keeps_class_proportions() -> None:
    y = np.repeat([0, 1, 2], [800, 150, 50]).astype(np.int64)
    x = np.arange(len(y), dtype=np.float32)[:, None]
    ds = Dataset("imbalanced", x, y, "classification", ["a", "b", "c"])
    for seed in (0, 1, 2):
        s = split_dataset(ds, seed=seed)
        for part in (s.y_train, s.y_val, s.y_test):
            share = np.bincount(part, minlength=3) / len(part)
            assert np.allclose(share, [0.8, 0.15, 0.05], atol=0.01), share


def test_regression_split() -> None:
    ds = load_builtin("builtin:synthetic_regression")
    s = split_dataset(ds, validation_split=0.25, test_split=0.1)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (675, 225, 100)
    assert s.y_train.dtype == np.float32


@pytest.mark.parametrize(("val", "test"), [(0.0, 0.2), (0.2, 1.0), (-0.1, 0.2), (0.2, 1.5), ("x", 0.2)])
def test_split_fractions_are_validated(val: object, test: object) -> None:
    with pytest.raises(DatasetError, match="between 0 and 1"):
        split_dataset(load_builtin("builtin:iris"), validation_split=val, test_split=test)  # type: ignore[arg-type]


def test_split_refuses_empty_parts_and_classes_missing_from_train() -> None:
    x = np.arange(12, dtype=np.float32)[:, None]
    tiny = Dataset("tiny", x, np.arange(12) % 2, "classification", ["a", "b"])
    with pytest.raises(DatasetError, match="empty"):
        split_dataset(tiny, test_split=0.01)
    # a single sample of class "b": wherever the fixed test split puts it, some seeds leave it out of train
    refused = 0
    for seed in range(40):
        y = np.zeros(12, dtype=np.int64)
        y[seed % 12] = 1
        lonely = Dataset("lonely", x, y, "classification", ["a", "b"])
        try:
            s = split_dataset(lonely, seed=seed)
        except DatasetError as exc:
            assert "class(es) b would have no training sample" in str(exc)
            refused += 1
        else:
            assert 1 in s.y_train
    assert refused > 0


# ---------------------------------------------------------------------------------------------------- IDX


@needs_mnist
def test_read_idx_gz_and_raw(tmp_path: Path) -> None:
    gz_images = MNIST_DIR / "t10k-images-idx3-ubyte.gz"
    images = read_idx(gz_images)
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress(gz_images.read_bytes()))
    assert np.array_equal(read_idx(raw), images)
    labels = read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10_000,) and set(np.unique(labels).tolist()) == set(range(10))


def test_read_idx_small_files(tmp_path: Path) -> None:
    images, labels = small_idx(20)
    (tmp_path / "a-images-idx3-ubyte").write_bytes(images)
    (tmp_path / "a-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    arr = read_idx(tmp_path / "a-images-idx3-ubyte")
    assert arr.shape == (20, 5, 4) and arr.dtype == np.uint8
    assert read_idx(tmp_path / "a-labels-idx1-ubyte.gz").tolist() == (np.arange(20) % 3).tolist()
    ds = load_idx_dir(tmp_path, "small")
    assert ds.name == "small" and ds.x.shape == (20, 1, 5, 4) and ds.classes == ["0", "1", "2"]
    assert np.allclose(ds.x[:, 0] * 255, arr)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    images, _ = small_idx(20)
    (tmp_path / "short").write_bytes(images[:-1])
    with pytest.raises(DatasetError, match="does not match"):
        read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(tmp_path / "png")


def test_load_idx_dir_needs_matching_labels(tmp_path: Path) -> None:
    images, _ = small_idx(20)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(images)
    with pytest.raises(DatasetError, match="labels"):
        load_idx_dir(tmp_path)


# ------------------------------------------------------------------------------------------------ storage


@pytest.mark.parametrize("ref", ["builtin:iris", "builtin:digits", "builtin:synthetic_regression"])
def test_save_load_round_trip(tmp_path: Path, ref: str) -> None:
    ds = load_builtin(ref)
    path = tmp_path / "ds.npz"
    save_dataset(ds, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ds.npz"]
    back = load_saved(path)
    assert np.array_equal(back.x, ds.x) and back.x.dtype == ds.x.dtype
    assert np.array_equal(back.y, ds.y) and back.y.dtype == ds.y.dtype
    assert (back.name, back.task, back.classes) == (ds.name, ds.task, ds.classes)
    assert back.feature_names == ds.feature_names and back.feature_groups == ds.feature_groups
    assert content_hash(back) == content_hash(ds)
    with np.load(path, allow_pickle=False) as npz:  # nothing in the file needs pickle
        assert {npz[k].dtype.hasobject for k in npz.files} == {False}


def test_upload_round_trip_keeps_groups(tmp_path: Path) -> None:
    ds = parse_upload(
        "csv",
        {"data": flower_csv()},
        label_column="species",
        feature_groups={"petal": ["pl", "pw"]},
        name="f",
    )
    save_dataset(ds, tmp_path / "f.data")
    back = load_saved(tmp_path / "f.data")
    assert back.feature_groups == {"petal": [2, 3]} and back.classes == ds.classes
    assert content_hash(back) == content_hash(ds)


def test_content_hash_tracks_content_not_name() -> None:
    ds = load_builtin("builtin:iris")
    base = content_hash(ds)
    assert len(base) == 64
    renamed = Dataset("other", ds.x, ds.y, ds.task, ds.classes, ds.feature_names, ds.feature_groups)
    assert content_hash(renamed) == base
    y = ds.y.copy()
    y[0] = 1
    assert (
        content_hash(Dataset("iris", ds.x, y, ds.task, ds.classes, ds.feature_names, ds.feature_groups))
        != base
    )
    x = ds.x.copy()
    x[5, 2] += 0.5
    assert (
        content_hash(Dataset("iris", x, ds.y, ds.task, ds.classes, ds.feature_names, ds.feature_groups))
        != base
    )
    assert content_hash(Dataset("iris", ds.x, ds.y, ds.task, ds.classes, ds.feature_names, None)) != base
    classes = ["a", "b", "c"]
    assert (
        content_hash(Dataset("iris", ds.x, ds.y, ds.task, classes, ds.feature_names, ds.feature_groups))
        != base
    )


def test_load_saved_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    path.write_bytes(npz_bytes(X=np.zeros((3, 2))))
    with pytest.raises(DatasetError, match="not a saved dataset"):
        load_saved(path)
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(DatasetError, match="not a saved dataset"):
        load_saved(path)


# ----------------------------------------------------------------------------------------------- describe


def test_describe_tabular_and_images() -> None:
    d = describe(load_builtin("builtin:iris"))
    assert d["samples"] == 150 and d["task"] == "classification"
    assert d["input_shape"] == [4] and d["image_shape"] is None and d["features"] == 4
    assert d["classes"] == ["setosa", "versicolor", "virginica"] and d["n_classes"] == 3
    assert d["groups"] == {"sepal": [0, 1], "petal": [2, 3]}
    assert d["class_counts"] == {"setosa": 50, "versicolor": 50, "virginica": 50}
    d = describe(load_builtin("builtin:digits"))
    assert d["image_shape"] == [1, 8, 8] and d["features"] == 64 and sum(d["class_counts"].values()) == 1797
    d = describe(load_builtin("builtin:synthetic_regression"))
    assert d["class_counts"] is None and d["n_classes"] is None and d["target_stats"]["std"] > 0


def test_module_does_not_import_torch() -> None:
    code = "import sys, app.ml.data, app.ml.uploads; sys.exit(1 if 'torch' in sys.modules else 0)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0
