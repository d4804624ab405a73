"""Datasets: built-ins, MNIST IDX files, fixed splits and storage (client uploads: app.ml.uploads).

Shared by the API process and the workers, so it depends on numpy, scikit-learn and the standard library
only (no torch).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import re
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import datasets as skd
from sklearn.model_selection import train_test_split

TASKS = ("classification", "regression")
# The test split is drawn with this seed whatever the study seed, so every study on a dataset shares it.
TEST_SPLIT_SEED = 20_240_917
SAVE_FORMAT = 1

_LOCAL_MAX_BYTES = 16 * 2**30  # bound for trusted local files (read_idx, load_idx_dir)
GZIP_MAGIC = b"\x1f\x8b"


class DatasetError(ValueError):
    """A bad upload or an unknown dataset; the message is meant for the client (4xx)."""


class DatasetTooLarge(DatasetError):
    """An upload over the size limit (HTTP 413)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Features, targets and the metadata the models and the API need."""

    name: str
    x: np.ndarray
    y: np.ndarray
    task: str
    classes: list[str] | None = None
    feature_names: list[str] | None = None
    feature_groups: dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DatasetError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.x.ndim < 2 or self.y.ndim < 1 or len(self.x) != len(self.y):
            raise DatasetError(f"inconsistent shapes: x {self.x.shape}, y {self.y.shape}")
        if self.task == "classification" and not self.classes:
            raise DatasetError("a classification dataset needs its class labels")

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) for image data, None for tabular data."""
        if self.x.ndim != 4:
            return None
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def n_outputs(self) -> int:
        """Number of classes (classification) or target dimensions (regression)."""
        if self.task == "classification":
            return len(self.classes or [])
        return 1 if self.y.ndim == 1 else int(np.prod(self.y.shape[1:]))


@dataclass(frozen=True, eq=False)
class Splits:
    """Train / validation / test arrays; the test split is fixed per dataset."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


BUILTINS: dict[str, str] = {
    "builtin:digits": "8x8 handwritten digits as 1x8x8 images in [0, 1], 1,797 samples, 10 classes",
    "builtin:iris": "iris flowers, 150 samples, 4 features (groups sepal/petal), 3 classes",
    "builtin:wine": "wine cultivars, 178 samples, 13 features, 3 classes",
    "builtin:breast_cancer": "breast cancer diagnosis, 569 samples, 30 features, 2 classes",
    "builtin:synthetic": "synthetic classification, 2,000 samples, 20 features, 3 classes",
    "builtin:synthetic_regression": "synthetic regression, 1,000 samples, 10 features, 1 target",
    "builtin:mnist": "MNIST IDX files as 1x28x28 images in [0, 1], 10 classes (needs the MNIST directory)",
}


# ---------------------------------------------------------------------------------------------- built-ins


def load_builtin(ref: str, *, mnist_dir: Path | None = None) -> Dataset:
    """Load a built-in dataset by reference, e.g. "builtin:iris"; nothing is downloaded."""
    if ref == "builtin:mnist":
        if mnist_dir is None:
            raise DatasetError("builtin:mnist is not available: no MNIST directory is configured")
        return load_idx_dir(Path(mnist_dir), "mnist")
    loader = _BUILTIN_LOADERS.get(ref)
    if loader is None:
        raise DatasetError(f"unknown dataset {ref!r}; built-ins: {', '.join(BUILTINS)}")
    return loader()


def _sklearn_tabular(name: str, bunch: Any, groups: dict[str, list[int]] | None = None) -> Dataset:
    """Wrap a bundled scikit-learn classification dataset."""
    return Dataset(
        name=name,
        x=np.asarray(bunch.data, dtype=np.float32),
        y=np.asarray(bunch.target, dtype=np.int64),
        task="classification",
        classes=[str(c) for c in bunch.target_names],
        feature_names=[str(f) for f in bunch.feature_names],
        feature_groups=groups,
    )


def _digits() -> Dataset:
    bunch = skd.load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    classes = [str(c) for c in bunch.target_names]
    return Dataset("digits", x, np.asarray(bunch.target, dtype=np.int64), "classification", classes)


def _iris() -> Dataset:
    return _sklearn_tabular("iris", skd.load_iris(), {"sepal": [0, 1], "petal": [2, 3]})


def _wine() -> Dataset:
    return _sklearn_tabular("wine", skd.load_wine())


def _breast_cancer() -> Dataset:
    return _sklearn_tabular("breast_cancer", skd.load_breast_cancer())


def _synthetic() -> Dataset:
    x, y = skd.make_classification(
        n_samples=2000, n_features=20, n_informative=10, n_redundant=4, n_classes=3, random_state=0
    )
    return Dataset(
        name="synthetic",
        x=x.astype(np.float32),
        y=y.astype(np.int64),
        task="classification",
        classes=["0", "1", "2"],
        feature_names=[f"f{i}" for i in range(20)],
    )


def _synthetic_regression() -> Dataset:
    x, y = skd.make_regression(n_samples=1000, n_features=10, noise=10.0, random_state=0)
    return Dataset(
        name="synthetic_regression",
        x=x.astype(np.float32),
        y=y.astype(np.float32),
        task="regression",
        feature_names=[f"f{i}" for i in range(10)],
    )


_BUILTIN_LOADERS = {
    "builtin:digits": _digits,
    "builtin:iris": _iris,
    "builtin:wine": _wine,
    "builtin:breast_cancer": _breast_cancer,
    "builtin:synthetic": _synthetic,
    "builtin:synthetic_regression": _synthetic_regression,
}


# ------------------------------------------------------------------------------------------------- splits


def split_dataset(
    ds: Dataset, *, validation_split: float = 0.2, test_split: float = 0.2, seed: int = 0
) -> Splits:
    """Hold out the test split with a fixed seed, then take the validation split from the rest with `seed`.

    Both steps are stratified for classification when every class is large enough to allow it.
    """
    for label, frac in (("validation_split", validation_split), ("test_split", test_split)):
        _check_fraction(label, frac)
    rest_idx, test_idx = _split_indices(ds, np.arange(len(ds.y)), test_split, TEST_SPLIT_SEED, "test")
    train_pos, val_pos = _split_indices(ds, rest_idx, validation_split, seed, "validation")
    train_idx, val_idx = rest_idx[train_pos], rest_idx[val_pos]
    if ds.task == "classification":
        missing = set(range(len(ds.classes or []))) - set(np.unique(ds.y[train_idx]).tolist())
        if missing:
            names = ", ".join((ds.classes or [])[i] for i in sorted(missing))
            raise DatasetError(f"too few samples: class(es) {names} would have no training sample")
    return Splits(
        x_train=ds.x[train_idx],
        y_train=ds.y[train_idx],
        x_val=ds.x[val_idx],
        y_val=ds.y[val_idx],
        x_test=ds.x[test_idx],
        y_test=ds.y[test_idx],
    )


def _check_fraction(label: str, frac: object) -> None:
    try:
        ok = not isinstance(frac, bool) and 0.0 < float(frac) < 1.0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DatasetError(f"{label} must be strictly between 0 and 1, got {frac!r}")


def _split_indices(
    ds: Dataset, idx: np.ndarray, frac: float, seed: int, label: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split `idx` into (kept, taken) with about `frac` of it taken; returns positions into `idx`."""
    n = len(idx)
    n_take = int(round(float(frac) * n))
    if n_take < 1 or n_take >= n:
        raise DatasetError(f"{n} samples are too few for a {label} split of {frac}: a split would be empty")
    y = ds.y[idx]
    stratify = y if ds.task == "classification" and _can_stratify(y, n_take) else None
    positions = np.arange(n)
    kept, taken = train_test_split(
        positions, test_size=n_take, random_state=seed, shuffle=True, stratify=stratify
    )
    return np.sort(kept), np.sort(taken)


def _can_stratify(y: np.ndarray, n_take: int) -> bool:
    """Whether scikit-learn can stratify this split (every class twice, both sides at least one per class)."""
    counts = np.unique(y, return_counts=True)[1]
    k = len(counts)
    return bool(counts.min() >= 2 and n_take >= k and len(y) - n_take >= k)


# ---------------------------------------------------------------------------------------------------- IDX


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped or not (detected by its magic bytes)."""
    data = Path(path).read_bytes()
    if data.startswith(GZIP_MAGIC):
        data = gunzip_bounded(data, _LOCAL_MAX_BYTES, Path(path).name)
    return parse_idx(data, Path(path).name)


def load_idx_dir(directory: Path, name: str = "mnist") -> Dataset:
    """Load every *images-idx3* / *labels-idx1* pair in a directory (.gz or not) as one image dataset."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{name}: the IDX directory does not exist")
    images = _idx_files(directory, "images", "idx3")
    labels = _idx_files(directory, "labels", "idx1")
    if not images:
        raise DatasetError(f"{name}: no *images-idx3* file in the IDX directory")
    xs, ys = [], []
    for prefix, image_path in sorted(images.items()):
        label_path = labels.get(prefix)
        if label_path is None:
            raise DatasetError(f"{name}: no labels-idx1 file matches {image_path.name}")
        x, y = read_idx(image_path), read_idx(label_path)
        check_idx_pair(x, y)
        xs.append(x)
        ys.append(y)
    return image_dataset(name, np.concatenate(xs), np.concatenate(ys))


def _idx_files(directory: Path, kind: str, idx: str) -> dict[str, Path]:
    """Files named like `<prefix><kind>-<idx>...` (also `.` for `-`), first match per prefix."""
    pattern = re.compile(rf"^(.*){kind}[-.]{idx}", re.IGNORECASE)
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        match = pattern.match(path.name)
        if match and path.is_file():
            found.setdefault(match.group(1), path)
    return found


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, label: str, magic: int | None = None) -> np.ndarray:
    """Decode IDX bytes, checking the magic number and that the size matches the header."""
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES or data[3] == 0:
        expected = f" (magic {magic} expected)" if magic else ""
        raise DatasetError(f"{label} is not an IDX file{expected}")
    found = int.from_bytes(data[:4], "big")
    if magic is not None and found != magic:
        raise DatasetError(f"{label}: IDX magic number {found}, expected {magic}")
    ndim, dtype = data[3], _IDX_DTYPES[data[2]]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{label}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_size = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected_size:
        raise DatasetError(f"{label}: IDX size {len(data)} bytes does not match its header ({expected_size})")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def check_idx_pair(images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST layout: uint8 images (n, H, W) and uint8 labels (n,)."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError("IDX images must be unsigned bytes of shape (n, rows, cols)")
    if labels.ndim != 1:
        raise DatasetError("IDX labels must be one-dimensional")
    if len(images) != len(labels):
        raise DatasetError(f"IDX image count ({len(images)}) and label count ({len(labels)}) differ")


def image_dataset(name: str, images: np.ndarray, labels: np.ndarray) -> Dataset:
    """uint8 (n, H, W) images and integer labels -> a classification dataset with x in [0, 1]."""
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    y, classes = encode_classes(labels.astype(np.int64), "labels")
    return Dataset(name, x, y, "classification", classes)


def encode_classes(labels: np.ndarray, column: str) -> tuple[np.ndarray, list[str]]:
    """Map labels to ids 0..k-1 in sorted order; numbers must be whole (else it is a regression target)."""
    if labels.dtype.kind in "fc":
        if not np.isfinite(labels).all():
            raise DatasetError(f"{column} contain NaN or infinite values")
        if not np.array_equal(labels, np.round(labels)):
            raise DatasetError(
                f"{column} hold non-integer numbers: use task='regression' for continuous targets"
            )
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "iubUS":
        raise DatasetError(f"{column} must be integers or strings, not {labels.dtype}")
    uniques, ids = np.unique(labels, return_inverse=True)
    classes = [v.decode() if isinstance(v, bytes) else str(v) for v in uniques.tolist()]
    return ids.astype(np.int64).reshape(-1), classes


def gunzip_bounded(data: bytes, max_bytes: int, label: str) -> bytes:
    """Stream-decompress gzip data, stopping as soon as the output passes `max_bytes`."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            out = f.read(max(max_bytes, 0) + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{label}: corrupt gzip data ({exc})") from None
    if len(out) > max_bytes:
        raise DatasetTooLarge(f"{label}: decompressed data is over the limit of {max_bytes} bytes")
    return out


# ---------------------------------------------------------------------------------------- hash and storage


def _metadata(ds: Dataset) -> dict[str, Any]:
    """Everything but the arrays, JSON-ready."""
    return {
        "name": ds.name,
        "task": ds.task,
        "classes": list(ds.classes) if ds.classes is not None else None,
        "feature_names": list(ds.feature_names) if ds.feature_names is not None else None,
        "feature_groups": (
            {g: [int(i) for i in idx] for g, idx in ds.feature_groups.items()}
            if ds.feature_groups is not None
            else None
        ),
    }


def content_hash(ds: Dataset) -> str:
    """SHA-256 over the arrays (dtype, shape, bytes) and metadata; the display name is left out."""
    meta = _metadata(ds)
    meta.pop("name")
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for arr in (ds.x, ds.y):
        a = np.ascontiguousarray(arr)
        h.update(json.dumps([a.dtype.str, list(a.shape)]).encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def save_dataset(ds: Dataset, path: Path) -> None:
    """Write x, y and a JSON metadata entry to an .npz file (no object arrays), atomically."""
    path = Path(path)
    meta = {"format": SAVE_FORMAT, **_metadata(ds)}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                x=np.ascontiguousarray(ds.x),
                y=np.ascontiguousarray(ds.y),
                meta=np.array([json.dumps(meta)]),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_saved(path: Path) -> Dataset:
    """Read a dataset written by save_dataset."""
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            x, y = np.asarray(npz["x"]), np.asarray(npz["y"])
            meta = json.loads(str(npz["meta"][0]))
        if meta["format"] != SAVE_FORMAT:
            raise DatasetError(f"not a saved dataset: unknown format {meta['format']!r}")
        return Dataset(
            name=meta["name"],
            x=x,
            y=y,
            task=meta["task"],
            classes=meta["classes"],
            feature_names=meta["feature_names"],
            feature_groups=meta["feature_groups"],
        )
    except (OSError, ValueError, KeyError, IndexError, TypeError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"not a saved dataset: {exc}") from None


def describe(ds: Dataset) -> dict[str, Any]:
    """A JSON-ready summary for the API and the CLI."""
    out: dict[str, Any] = {
        "name": ds.name,
        "samples": int(len(ds.y)),
        "task": ds.task,
        "input_shape": list(ds.input_shape),
        "image_shape": list(ds.image_shape) if ds.image_shape else None,
        "features": int(math.prod(ds.input_shape)),
        "feature_names": list(ds.feature_names) if ds.feature_names is not None else None,
        "classes": list(ds.classes) if ds.classes is not None else None,
        "n_classes": len(ds.classes) if ds.classes is not None else None,
        "n_outputs": ds.n_outputs,
        "groups": _metadata(ds)["feature_groups"],
        "class_counts": None,
        "target_stats": None,
    }
    if ds.task == "classification" and ds.classes is not None:
        counts = np.bincount(ds.y.astype(np.int64), minlength=len(ds.classes))
        out["class_counts"] = {c: int(n) for c, n in zip(ds.classes, counts, strict=False)}
    else:
        y = ds.y.astype(np.float64)
        out["target_stats"] = {
            "mean": float(y.mean()),
            "std": float(y.std()),
            "min": float(y.min()),
            "max": float(y.max()),
        }
    return out
