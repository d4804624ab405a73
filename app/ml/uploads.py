"""Client uploads (CSV, NPZ, MNIST IDX) parsed defensively into a Dataset.

File signatures are checked, sizes are bounded before anything is decompressed, and nothing from a client
is ever unpickled. Like app.ml.data, no torch here.
"""

from __future__ import annotations

import csv
import io
import math
import re
import zipfile
import zlib
from collections.abc import Sequence

import numpy as np

from app.ml.data import (
    GZIP_MAGIC,
    TASKS,
    Dataset,
    DatasetError,
    DatasetTooLarge,
    check_idx_pair,
    encode_classes,
    gunzip_bounded,
    image_dataset,
    parse_idx,
)

DEFAULT_MAX_BYTES = 200 * 2**20
MIN_SAMPLES = 10
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_MAGIC = b"\x80"
_IDX_IMAGES = 2051  # unsigned bytes, 3 dimensions
_IDX_LABELS = 2049  # unsigned bytes, 1 dimension
_NPZ_KEYS = ("X", "y", "feature_names")
_NPZ_MEMBER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.npy$")
_PICKLED = "pickled objects are not accepted"


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
    if data.startswith(_ZIP_MAGICS + (GZIP_MAGIC, _NPY_MAGIC)) or b"\x00" in data[:65536]:
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
        return encode_classes(np.asarray(values), column)
    _check_finite_labels(numbers, values, column, lines)
    return encode_classes(numbers, column)


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
    return encode_classes(y, "labels")


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
    x = parse_idx(raw_images, "images", _IDX_IMAGES)
    y = parse_idx(raw_labels, "labels", _IDX_LABELS)
    check_idx_pair(x, y)
    return image_dataset(name, x, y)


def _maybe_gunzip(data: bytes, max_bytes: int, label: str) -> bytes:
    """Decompress gzip data (bounded), pass anything else through."""
    if not data.startswith(GZIP_MAGIC):
        return data
    out = gunzip_bounded(data, max_bytes, label)
    if out.startswith(_PICKLE_MAGIC):
        raise DatasetError(f"{_PICKLED} ({label} holds a pickle)")
    return out
