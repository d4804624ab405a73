"""Datasets: built-ins, MNIST IDX files, validated client uploads, fixed splits and storage.

Shared by the API process and the workers, so it depends on numpy, scikit-learn and the standard library
only (no torch). Uploads are parsed defensively: file signatures are checked, sizes are bounded before
anything is decompressed, and nothing from a client is ever unpickled.
"""

from __future__ import annotations

import csv
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import datasets as skd
from sklearn.model_selection import train_test_split

TASKS = ("classification", "regression")
MIN_SAMPLES = 10
DEFAULT_MAX_BYTES = 200 * 2**20
# The test split is drawn with this seed whatever the study seed, so every study on a dataset shares it.
TEST_SPLIT_SEED = 20_240_917
SAVE_FORMAT = 1

_LOCAL_MAX_BYTES = 16 * 2**30  # bound for trusted local files (read_idx, load_idx_dir)
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_MAGIC = b"\x80"
_IDX_IMAGES = 2051  # unsigned bytes, 3 dimensions
_IDX_LABELS = 2049  # unsigned bytes, 1 dimension
_NPZ_KEYS = ("X", "y", "feature_names")
_NPZ_MEMBER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.npy$")
_PICKLED = "pickled objects are not accepted"


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
    if data.startswith(_GZIP_MAGIC):
        data = _gunzip(data, _LOCAL_MAX_BYTES, Path(path).name)
    return _parse_idx(data, Path(path).name)


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
        _check_idx_pair(x, y)
        xs.append(x)
        ys.append(y)
    return _image_dataset(name, np.concatenate(xs), np.concatenate(ys))


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


def _parse_idx(data: bytes, label: str, magic: int | None = None) -> np.ndarray:
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


def _check_idx_pair(images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST layout: uint8 images (n, H, W) and uint8 labels (n,)."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError("IDX images must be unsigned bytes of shape (n, rows, cols)")
    if labels.ndim != 1:
        raise DatasetError("IDX labels must be one-dimensional")
    if len(images) != len(labels):
        raise DatasetError(f"IDX image count ({len(images)}) and label count ({len(labels)}) differ")


def _image_dataset(name: str, images: np.ndarray, labels: np.ndarray) -> Dataset:
    """uint8 (n, H, W) images and integer labels -> a classification dataset with x in [0, 1]."""
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    y, classes = _encode_classes(labels.astype(np.int64), "labels")
    return Dataset(name, x, y, "classification", classes)


# ------------------------------------------------------------------------------------------------ uploads


def parse_upload(
    kind: str,
    files: dict[str, bytes],
    *,
    label_column: str | None = None,
    feature_groups: dict[str, list[str]] | None = None,
    task: str | None = None,
    name: str = "upload",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Dataset:
    """Validate and decode a client upload ("csv", "npz" or "idx") into a Dataset."""
    if task is not None and task not in TASKS:
        raise DatasetError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    parser = _UPLOAD_PARSERS.get(kind)
    if parser is None:
        raise DatasetError(f"unknown upload kind {kind!r}; expected one of {', '.join(_UPLOAD_PARSERS)}")
    _check_files(kind, files, max_bytes)
    if kind == "csv":
        ds = _parse_csv(files["data"], label_column, feature_groups, task, name)
    elif kind == "npz":
        ds = _parse_npz(files["data"], feature_groups, task, name, max_bytes)
    else:
        if feature_groups:
            raise DatasetError("feature groups apply to tabular data only")
        if task == "regression":
            raise DatasetError("IDX uploads are image classification datasets")
        ds = _parse_idx_upload(files["images"], files["labels"], name, max_bytes)
    _check_dataset(ds)
    return ds


_UPLOAD_PARSERS = {"csv": ("data",), "npz": ("data",), "idx": ("images", "labels")}


def _check_files(kind: str, files: dict[str, bytes], max_bytes: int) -> None:
    """Expected file fields, total size, and no pickles."""
    expected = _UPLOAD_PARSERS[kind]
    if set(files) != set(expected):
        raise DatasetError(
            f"a {kind} upload takes the file field(s) {', '.join(expected)}, got {sorted(files)}"
        )
    for field, data in files.items():
        if not isinstance(data, bytes | bytearray):
            raise DatasetError(f"file {field!r} must be bytes")
    total = sum(len(b) for b in files.values())
    if total > max_bytes:
        raise DatasetTooLarge(f"upload is {total} bytes, over the limit of {max_bytes}")
    for field, data in files.items():
        if data.startswith(_PICKLE_MAGIC):
            raise DatasetError(f"{_PICKLED} (file {field!r} is a pickle)")


def _check_dataset(ds: Dataset) -> None:
    """Checks every upload must pass: enough samples, finite values, at least two classes."""
    if len(ds.y) < MIN_SAMPLES:
        raise DatasetError(f"too few samples: {len(ds.y)} (at least {MIN_SAMPLES} needed)")
    if not np.isfinite(ds.x).all():
        raise DatasetError("features contain NaN or infinite values")
    if ds.task == "regression" and not np.isfinite(ds.y).all():
        raise DatasetError("targets contain NaN or infinite values")
    if ds.task == "classification" and len(ds.classes or []) < 2:
        raise DatasetError("classification needs at least 2 classes")


# CSV ---------------------------------------------------------------------------------------------------


def _parse_csv(
    data: bytes,
    label_column: str | None,
    feature_groups: dict[str, list[str]] | None,
    task: str | None,
    name: str,
) -> Dataset:
    """A header row, a label column and numeric feature columns."""
    if not label_column:
        raise DatasetError("a CSV upload needs label_column")
    header, rows, lines = _csv_rows(_csv_text(data))
    if label_column not in header:
        raise DatasetError(f"label column {label_column!r} is not in the header: {', '.join(header)}")
    if len(rows) < MIN_SAMPLES:
        raise DatasetError(f"too few samples: {len(rows)} (at least {MIN_SAMPLES} needed)")
    label_at = header.index(label_column)
    feature_names = [h for i, h in enumerate(header) if i != label_at]
    if not feature_names:
        raise DatasetError("the CSV has no feature columns besides the label column")
    x = np.empty((len(rows), len(feature_names)), dtype=np.float32)
    for j, col in enumerate(i for i in range(len(header)) if i != label_at):
        x[:, j] = _numeric_column([r[col] for r in rows], header[col], lines)
    y, classes = _csv_labels([r[label_at] for r in rows], label_column, lines, task)
    groups = _group_indices(feature_groups, feature_names, label_column)
    task = task or "classification"
    return Dataset(name, x, y, task, classes, feature_names, groups)


def _csv_text(data: bytes) -> str:
    """Decode CSV bytes, refusing binary files."""
    if data.startswith(_ZIP_MAGICS + (_GZIP_MAGIC, _NPY_MAGIC)) or b"\x00" in data[:65536]:
        raise DatasetError("the file is binary data, not CSV text")
    try:
        return bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"the CSV is not UTF-8 text (byte {exc.start})") from None


def _csv_rows(text: str) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, data rows and their line numbers; blank lines are skipped."""
    first = text.split("\n", 1)[0]
    delimiter = max((",", ";", "\t"), key=first.count) if first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DatasetError("the CSV is empty") from None
    except csv.Error as exc:
        raise DatasetError(f"malformed CSV header: {exc}") from None
    _check_header(header)
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        for row in reader:
            if not row or all(not v.strip() for v in row):
                continue
            if len(row) != len(header):
                raise DatasetError(
                    f"line {reader.line_num}: {len(row)} fields, but the header has {len(header)}"
                )
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise DatasetError(f"malformed CSV at line {reader.line_num}: {exc}") from None
    return header, rows, lines


def _check_header(header: list[str]) -> None:
    """Column names must be present and unique."""
    for i, h in enumerate(header):
        if not h:
            raise DatasetError(f"header column {i + 1} has no name (a header row is required)")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DatasetError(f"duplicate column name(s) in the header: {', '.join(dupes)}")


def _numeric_column(values: list[str], column: str, lines: list[int]) -> np.ndarray:
    """Parse one feature column as finite floats, naming the first bad cell."""
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        try:
            out[i] = float(v)
        except ValueError:
            raise DatasetError(f"column {column!r}, line {lines[i]}: {v.strip()!r} is not a number") from None
        if not math.isfinite(out[i]):
            raise DatasetError(f"column {column!r}, line {lines[i]}: {v.strip()!r} is not a finite number")
    if np.abs(out).max(initial=0.0) > np.finfo(np.float32).max:
        raise DatasetError(f"column {column!r} holds values too large for float32")
    return out


def _csv_labels(
    values: list[str], column: str, lines: list[int], task: str | None
) -> tuple[np.ndarray, list[str] | None]:
    """Label cells -> float targets (regression) or class ids with their labels (classification)."""
    values = [v.strip() for v in values]
    for i, v in enumerate(values):
        if not v:
            raise DatasetError(f"column {column!r}, line {lines[i]}: missing label")
    numbers = _try_floats(values)
    if task == "regression":
        if numbers is None:
            numbers = _numeric_column(values, column, lines)
        _check_finite_labels(numbers, values, column, lines)
        return numbers.astype(np.float32), None
    if numbers is None:
        bad = next((i for i, v in enumerate(values) if _is_non_finite(v)), None)
        if bad is not None:
            raise DatasetError(f"column {column!r}, line {lines[bad]}: {values[bad]!r} is not a valid label")
        return _encode_classes(np.asarray(values), column)
    _check_finite_labels(numbers, values, column, lines)
    return _encode_classes(numbers, column)


def _try_floats(values: list[str]) -> np.ndarray | None:
    """All cells as floats, or None when any is not a number."""
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None


def _is_non_finite(v: str) -> bool:
    try:
        return not math.isfinite(float(v))
    except ValueError:
        return False


def _check_finite_labels(numbers: np.ndarray, values: list[str], column: str, lines: list[int]) -> None:
    bad = np.flatnonzero(~np.isfinite(numbers))
    if bad.size:
        i = int(bad[0])
        raise DatasetError(f"column {column!r}, line {lines[i]}: {values[i]!r} is not a finite number")


def _encode_classes(labels: np.ndarray, column: str) -> tuple[np.ndarray, list[str]]:
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


def _group_indices(
    groups: dict[str, list[str]] | None, feature_names: list[str], label_column: str | None = None
) -> dict[str, list[int]] | None:
    """Feature group names -> column indices; unknown columns and overlaps are refused."""
    if not groups:
        return None
    if not isinstance(groups, dict):
        raise DatasetError("feature_groups must map group names to lists of column names")
    position = {n: i for i, n in enumerate(feature_names)}
    owner: dict[str, str] = {}
    out: dict[str, list[int]] = {}
    for group, columns in groups.items():
        if not isinstance(group, str) or not group:
            raise DatasetError("feature group names must be non-empty strings")
        if isinstance(columns, str) or not isinstance(columns, Sequence) or not columns:
            raise DatasetError(f"feature group {group!r} must be a non-empty list of column names")
        for col in columns:
            if col == label_column:
                raise DatasetError(f"feature group {group!r}: {col!r} is the label column")
            if col not in position:
                raise DatasetError(f"feature group {group!r}: unknown column {col!r}")
            if col in owner:
                raise DatasetError(f"column {col!r} is in two feature groups ({owner[col]!r}, {group!r})")
            owner[col] = group
        out[group] = [position[c] for c in columns]
    return out


# NPZ ---------------------------------------------------------------------------------------------------


def _parse_npz(
    data: bytes, feature_groups: dict[str, list[str]] | None, task: str | None, name: str, max_bytes: int
) -> Dataset:
    """An .npz archive with X (2-D tabular, 3-D or 4-D images), y and optional feature_names."""
    if data.startswith(_NPY_MAGIC):
        raise DatasetError("this is a single .npy array; upload an .npz archive holding X and y")
    if not data.startswith(_ZIP_MAGICS):
        raise DatasetError("the file is not an NPZ (zip) archive")
    arrays = _read_npz(bytes(data), max_bytes)
    for key in ("X", "y"):
        if key not in arrays:
            raise DatasetError(f"the NPZ archive has no {key!r} array (found: {', '.join(arrays) or 'none'})")
    x = _npz_features(arrays["X"])
    y_raw = arrays["y"]
    if y_raw.ndim == 0 or len(y_raw) != len(x):
        raise DatasetError(f"y must have one entry per sample: X has {len(x)}, y has shape {y_raw.shape}")
    y, classes = _npz_targets(y_raw, task)
    if x.ndim == 4:
        if feature_groups:
            raise DatasetError("feature groups apply to tabular data only")
        return Dataset(name, x, y, task or "classification", classes)
    names = _npz_feature_names(arrays.get("feature_names"), x.shape[1])
    groups = _group_indices(feature_groups, names)
    return Dataset(name, x, y, task or "classification", classes, names, groups)


def _read_npz(data: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    """Check the zip directory (members, declared sizes, .npy headers) before loading anything."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            _check_zip_directory(infos, max_bytes)
            for info in infos:
                _check_npy_header(zf, info)
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"the NPZ archive is corrupt: {exc}") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: np.asarray(npz[key]) for key in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DatasetError(_PICKLED) from None
        raise DatasetError(f"cannot read the NPZ archive: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DatasetError(f"cannot read the NPZ archive: {exc}") from None


def _check_zip_directory(infos: list[zipfile.ZipInfo], max_bytes: int) -> None:
    """Only plain `.npy` members with accepted names, and a bounded declared uncompressed size."""
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise DatasetTooLarge(f"the NPZ archive expands to {declared} bytes, over the limit of {max_bytes}")
    for info in infos:
        if not _NPZ_MEMBER.match(info.filename):
            raise DatasetError(f"unexpected member {info.filename!r} in the NPZ archive (only .npy arrays)")
        if info.filename[:-4] not in _NPZ_KEYS:
            accepted = ", ".join(_NPZ_KEYS)
            raise DatasetError(
                f"unexpected array {info.filename[:-4]!r} in the NPZ archive; accepted: {accepted}"
            )
        if info.flag_bits & 0x1:
            raise DatasetError("encrypted NPZ members are not accepted")


def _check_npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Refuse object dtypes and shapes larger than the member really holds."""
    key = info.filename[:-4]
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise DatasetError(f"{key}: unsupported .npy format version {version}")
            header_len = f.tell()
    except DatasetError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise DatasetError(_PICKLED) from None
        raise DatasetError(f"{key} is not a valid .npy array: {exc}") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{key} cannot be read: {exc}") from None
    if dtype.hasobject:
        raise DatasetError(f"{_PICKLED} ({key} is an object array)")
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size - header_len:
        raise DatasetError(f"{key}: the .npy header declares more data than the archive holds")


def _npz_features(x: np.ndarray) -> np.ndarray:
    """X as float32: 2-D tabular or (n, C, H, W) images (3-D gets a channel, channels-last is moved)."""
    if x.dtype.kind not in "biuf":
        raise DatasetError(f"X must be numeric, not {x.dtype}")
    if x.ndim not in (2, 3, 4):
        raise DatasetError(f"X must be 2-D (tabular), 3-D or 4-D (images), got shape {x.shape}")
    if min(x.shape) == 0:
        raise DatasetError(f"X is empty: shape {x.shape}")
    scale = 255.0 if x.ndim >= 3 and x.dtype == np.uint8 else 1.0
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4 and x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
        x = np.moveaxis(x, 3, 1)
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(x, dtype=np.float32)
    return out / np.float32(scale) if scale != 1.0 else out


def _npz_targets(y: np.ndarray, task: str | None) -> tuple[np.ndarray, list[str] | None]:
    """y -> float32 targets (regression) or class ids with labels (classification)."""
    if task == "regression":
        if y.dtype.kind not in "biuf":
            raise DatasetError(f"regression targets must be numeric, not {y.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            return np.ascontiguousarray(y, dtype=np.float32), None
    if y.ndim != 1:
        raise DatasetError(f"classification labels y must be 1-D, got shape {y.shape}")
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    return _encode_classes(y, "labels")


def _npz_feature_names(names: np.ndarray | None, n_features: int) -> list[str]:
    """Optional feature_names array (strings), else f0, f1, ..."""
    if names is None:
        return [f"f{i}" for i in range(n_features)]
    if names.dtype.kind not in "US" or names.shape != (n_features,):
        raise DatasetError(f"feature_names must be {n_features} strings, got {names.dtype} {names.shape}")
    out = [v.decode() if isinstance(v, bytes) else str(v) for v in names.tolist()]
    if len(set(out)) != len(out):
        raise DatasetError("feature_names must be unique")
    return out


# IDX uploads ----------------------------------------------------------------------------------------------


def _parse_idx_upload(images: bytes, labels: bytes, name: str, max_bytes: int) -> Dataset:
    """IDX images (magic 2051) and labels (magic 2049), each gzipped or not."""
    raw_images = _maybe_gunzip(bytes(images), max_bytes, "images")
    raw_labels = _maybe_gunzip(bytes(labels), max_bytes - len(raw_images), "labels")
    x = _parse_idx(raw_images, "images", _IDX_IMAGES)
    y = _parse_idx(raw_labels, "labels", _IDX_LABELS)
    _check_idx_pair(x, y)
    return _image_dataset(name, x, y)


def _maybe_gunzip(data: bytes, max_bytes: int, label: str) -> bytes:
    """Decompress gzip data (bounded), pass anything else through."""
    if not data.startswith(_GZIP_MAGIC):
        return data
    out = _gunzip(data, max_bytes, label)
    if out.startswith(_PICKLE_MAGIC):
        raise DatasetError(f"{_PICKLED} ({label} holds a pickle)")
    return out


def _gunzip(data: bytes, max_bytes: int, label: str) -> bytes:
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
