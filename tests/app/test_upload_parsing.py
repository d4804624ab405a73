"""The upload parser (app.ml.uploads): every format read into a Dataset, every unsafe or malformed file refused.
Uploads through the HTTP API are in test_uploads.py."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zipfile

import numpy as np
import pytest

from app.ml.data import DatasetError, DatasetTooLarge
from app.ml.uploads import parse_upload
from tests.factories import Payload, csv_bytes, flower_csv, idx_images, idx_labels, npz_bytes, small_idx

# ------------------------------------------------------------------------------------------ uploads: happy


def test_csv_upload_with_string_labels_and_groups() -> None:
    ds = parse_upload(
        "csv",
        {"data": flower_csv(30)},
        label_column="species",
        feature_groups={"sepal": ["sl", "sw"], "petal": ["pw", "pl"]},
        name="flowers",
    )
    assert ds.name == "flowers" and ds.task == "classification"
    assert ds.x.shape == (30, 4) and ds.x.dtype == np.float32
    assert ds.classes == ["setosa", "versicolor", "virginica"]  # sorted
    assert ds.y.dtype == np.int64
    # row i had label ["setosa", "virginica", "versicolor"][i % 3]
    assert ds.y[:3].tolist() == [0, 2, 1]
    assert ds.feature_names == ["sl", "sw", "pl", "pw"]
    assert ds.feature_groups == {"sepal": [0, 1], "petal": [3, 2]}


def test_csv_label_column_in_the_middle_and_integer_labels() -> None:
    rows = [[i, 10 * (i % 2) + 1, i * 0.5] for i in range(12)]
    ds = parse_upload("csv", {"data": csv_bytes(["a", "label", "b"], rows)}, label_column="label")
    assert ds.feature_names == ["a", "b"]
    assert ds.classes == ["1", "11"]
    assert np.allclose(ds.x[:, 1], [i * 0.5 for i in range(12)])
    assert ds.y.tolist() == [i % 2 for i in range(12)]


def test_csv_integer_labels_sort_numerically() -> None:
    rows = [[i, [2, 10, 9][i % 3]] for i in range(12)]
    ds = parse_upload("csv", {"data": csv_bytes(["a", "y"], rows)}, label_column="y")
    assert ds.classes == ["2", "9", "10"]


def test_csv_semicolon_and_bom() -> None:
    text = "\ufeffa;b;y\n" + "".join(f"{i};{i * 2};{'yes' if i % 2 else 'no'}\n" for i in range(10))
    ds = parse_upload("csv", {"data": text.encode()}, label_column="y")
    assert ds.x.shape == (10, 2) and ds.classes == ["no", "yes"]


def test_regression_csv() -> None:
    rows = [[i, i * 2, 0.5 + i * 1.25] for i in range(15)]
    ds = parse_upload(
        "csv", {"data": csv_bytes(["a", "b", "price"], rows)}, label_column="price", task="regression"
    )
    assert ds.task == "regression" and ds.classes is None
    assert ds.y.dtype == np.float32 and np.allclose(ds.y, [0.5 + i * 1.25 for i in range(15)])
    assert ds.n_outputs == 1


def test_continuous_labels_need_task_regression() -> None:
    rows = [[i, 0.5 + i * 1.25] for i in range(15)]
    with pytest.raises(DatasetError, match="regression"):
        parse_upload("csv", {"data": csv_bytes(["a", "price"], rows)}, label_column="price")


def test_npz_upload_images_get_a_channel() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 6, 5)).astype(np.uint8)
    y = np.arange(20) % 4
    ds = parse_upload("npz", {"data": npz_bytes(X=x, y=y)})
    assert ds.x.shape == (20, 1, 6, 5) and ds.x.dtype == np.float32
    assert ds.image_shape == (1, 6, 5)
    assert np.allclose(ds.x[:, 0] * 255, x)  # uint8 images are scaled to [0, 1]
    assert ds.classes == ["0", "1", "2", "3"] and ds.feature_groups is None


def test_npz_upload_channels_last_images_are_moved_first() -> None:
    x = np.random.default_rng(0).random((12, 8, 8, 3)).astype(np.float32)
    ds = parse_upload("npz", {"data": npz_bytes(X=x, y=np.arange(12) % 2)})
    assert ds.image_shape == (3, 8, 8)
    assert np.array_equal(ds.x[:, 2], x[..., 2])


def test_npz_upload_tabular_with_names_groups_and_string_labels() -> None:
    x = np.random.default_rng(0).random((12, 3))
    y = np.array(["cat", "dog", "emu"] * 4)
    data = npz_bytes(X=x, y=y, feature_names=np.array(["w", "h", "d"]))
    ds = parse_upload("npz", {"data": data}, feature_groups={"size": ["w", "h"], "depth": ["d"]})
    assert ds.x.dtype == np.float32 and ds.x.shape == (12, 3)
    assert ds.classes == ["cat", "dog", "emu"] and ds.y[:3].tolist() == [0, 1, 2]
    assert ds.feature_names == ["w", "h", "d"]
    assert ds.feature_groups == {"size": [0, 1], "depth": [2]}


def test_npz_regression_targets() -> None:
    x = np.random.default_rng(0).random((12, 3))
    ds = parse_upload("npz", {"data": npz_bytes(X=x, y=x.sum(axis=1))}, task="regression")
    assert ds.task == "regression" and ds.y.dtype == np.float32 and ds.n_outputs == 1


@pytest.mark.parametrize("gz", [False, True])
def test_idx_upload(gz: bool) -> None:
    images, labels = small_idx(20)
    if gz:
        images, labels = gzip.compress(images), gzip.compress(labels)
    ds = parse_upload("idx", {"images": images, "labels": labels}, name="tiny")
    assert ds.x.shape == (20, 1, 5, 4) and ds.classes == ["0", "1", "2"]
    assert ds.y.tolist() == (np.arange(20) % 3).tolist()


# ---------------------------------------------------------------------------------------- uploads: refused


@pytest.mark.parametrize(
    ("kind", "files"),
    [
        ("npz", {"data": pickle.dumps(Payload())}),
        ("csv", {"data": pickle.dumps(Payload())}),
        ("idx", {"images": pickle.dumps(Payload()), "labels": idx_labels(np.arange(20) % 3)}),
        ("idx", {"images": gzip.compress(pickle.dumps(Payload())), "labels": idx_labels(np.arange(20) % 3)}),
    ],
)
def test_pickle_bytes_are_refused(kind: str, files: dict[str, bytes]) -> None:
    assert pickle.dumps(Payload()).startswith(b"\x80")
    with pytest.raises(DatasetError, match="pickled objects are not accepted"):
        parse_upload(kind, files, label_column="y")


def test_npz_with_object_array_is_refused() -> None:
    x = np.empty((12, 2), dtype=object)
    x[:] = 1.0
    data = npz_bytes(X=x, y=np.arange(12) % 2)
    with pytest.raises(DatasetError, match="pickled objects are not accepted"):
        parse_upload("npz", {"data": data})


def test_npz_member_holding_a_pickle_is_refused() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("X.npy", pickle.dumps(Payload()))
        zf.writestr("y.npy", npz_member(np.arange(12) % 2))
    with pytest.raises(DatasetError, match="not a valid .npy"):
        parse_upload("npz", {"data": buf.getvalue()})


def npz_member(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_zip_bomb_is_refused_before_decompressing(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("X.npy", npz_member(np.zeros((2000, 1000), dtype=np.float32)))  # 8 MB of zeros
        zf.writestr("y.npy", npz_member(np.arange(2000) % 2))
    data = buf.getvalue()
    assert len(data) < 100_000
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self: zipfile.ZipFile, name: object, *args: object, **kwargs: object) -> object:
        opened.append(str(name))
        return real_open(self, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    with pytest.raises(DatasetTooLarge, match="expands"):
        parse_upload("npz", {"data": data}, max_bytes=1_000_000)
    assert opened == []  # nothing was decompressed


def test_zip_declaring_a_huge_member_is_refused_at_the_default_limit() -> None:
    data = bytearray(npz_bytes(X=np.zeros((12, 2)), y=np.arange(12) % 2))
    central = data.find(b"PK\x01\x02")
    data[central + 24 : central + 28] = struct.pack("<I", 0xFFFFFFF0)  # declared uncompressed size
    with pytest.raises(DatasetTooLarge):
        parse_upload("npz", {"data": bytes(data)})


def test_gzip_bomb_in_idx_is_refused() -> None:
    images = gzip.compress(idx_images(np.zeros((2000, 28, 28), dtype=np.uint8)))
    labels = idx_labels(np.arange(2000) % 2)
    assert len(images) + len(labels) < 100_000
    with pytest.raises(DatasetTooLarge):
        parse_upload("idx", {"images": images, "labels": labels}, max_bytes=200_000)


def test_npz_with_unexpected_members_is_refused() -> None:
    data = npz_bytes(X=np.zeros((12, 2)), y=np.arange(12) % 2, x_test=np.zeros((3, 2)))
    with pytest.raises(DatasetError, match="x_test"):
        parse_upload("npz", {"data": data})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../X.npy", npz_member(np.zeros((12, 2))))
    with pytest.raises(DatasetError, match="unexpected member"):
        parse_upload("npz", {"data": buf.getvalue()})


def test_npz_needs_x_and_y() -> None:
    with pytest.raises(DatasetError, match="'y'"):
        parse_upload("npz", {"data": npz_bytes(X=np.zeros((12, 2)))})
    with pytest.raises(DatasetError, match="one entry per sample"):
        parse_upload("npz", {"data": npz_bytes(X=np.zeros((12, 2)), y=np.arange(11) % 2)})
    with pytest.raises(DatasetError, match="numeric"):
        parse_upload("npz", {"data": npz_bytes(X=np.full((12, 2), "a"), y=np.arange(12) % 2)})


def test_wrong_signatures_are_refused() -> None:
    with pytest.raises(DatasetError, match="not an NPZ"):
        parse_upload("npz", {"data": flower_csv()})
    png = b"\x89PNG\r\n\x1a\n" + bytes(200)
    _, labels = small_idx(20)
    with pytest.raises(DatasetError, match="not an IDX file"):
        parse_upload("idx", {"images": png, "labels": labels})
    images, _ = small_idx(20)
    with pytest.raises(DatasetError, match="2049"):
        parse_upload("idx", {"images": images, "labels": images})  # images file where labels belong
    with pytest.raises(DatasetError, match="not CSV"):
        parse_upload("csv", {"data": npz_bytes(X=np.zeros((12, 2)), y=np.arange(12))}, label_column="y")
    with pytest.raises(DatasetError, match="single .npy"):
        parse_upload("npz", {"data": npz_member(np.zeros((12, 2)))})


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", ""])
def test_non_finite_or_missing_value_in_csv(bad: str) -> None:
    rows = [[i, i * 2, i % 2] for i in range(12)]
    rows[6][1] = bad
    with pytest.raises(DatasetError, match=r"column 'b', line 8"):
        parse_upload("csv", {"data": csv_bytes(["a", "b", "y"], rows)}, label_column="y")


def test_nan_label_is_refused() -> None:
    rows = [[i, ["x", "y"][i % 2]] for i in range(12)]
    rows[3][1] = "nan"
    with pytest.raises(DatasetError, match="line 5"):
        parse_upload("csv", {"data": csv_bytes(["a", "label"], rows)}, label_column="label")
    rows = [[i, i * 0.5] for i in range(12)]
    rows[3][1] = "inf"
    with pytest.raises(DatasetError, match="line 5"):
        parse_upload("csv", {"data": csv_bytes(["a", "t"], rows)}, label_column="t", task="regression")


def test_nan_in_npz_is_refused() -> None:
    x = np.zeros((12, 2))
    x[3, 1] = np.nan
    with pytest.raises(DatasetError, match="NaN"):
        parse_upload("npz", {"data": npz_bytes(X=x, y=np.arange(12) % 2)})
    y = np.arange(12, dtype=np.float64)
    y[2] = np.inf
    with pytest.raises(DatasetError, match="NaN or infinite"):
        parse_upload("npz", {"data": npz_bytes(X=np.zeros((12, 2)), y=y)}, task="regression")


def test_non_numeric_column_names_column_and_line() -> None:
    rows = [[i, "3.5", i % 2] for i in range(12)]
    rows[4][1] = "tall"
    with pytest.raises(DatasetError, match=r"column 'height', line 6: 'tall' is not a number"):
        parse_upload("csv", {"data": csv_bytes(["a", "height", "y"], rows)}, label_column="y")


def test_missing_label_column() -> None:
    with pytest.raises(DatasetError, match="label column 'class' is not in the header"):
        parse_upload("csv", {"data": flower_csv()}, label_column="class")
    with pytest.raises(DatasetError, match="label_column"):
        parse_upload("csv", {"data": flower_csv()})


def test_feature_group_errors() -> None:
    with pytest.raises(DatasetError, match="unknown column 'stem'"):
        parse_upload(
            "csv", {"data": flower_csv()}, label_column="species", feature_groups={"a": ["sl", "stem"]}
        )
    with pytest.raises(DatasetError, match="two feature groups"):
        parse_upload(
            "csv",
            {"data": flower_csv()},
            label_column="species",
            feature_groups={"a": ["sl"], "b": ["sl", "pl"]},
        )
    with pytest.raises(DatasetError, match="label column"):
        parse_upload("csv", {"data": flower_csv()}, label_column="species", feature_groups={"a": ["species"]})
    images, labels = small_idx(20)
    with pytest.raises(DatasetError, match="tabular"):
        parse_upload("idx", {"images": images, "labels": labels}, feature_groups={"a": ["x"]})


def test_too_few_samples() -> None:
    with pytest.raises(DatasetError, match="too few samples: 9"):
        parse_upload("csv", {"data": flower_csv(9)}, label_column="species")
    with pytest.raises(DatasetError, match="too few samples"):
        parse_upload("npz", {"data": npz_bytes(X=np.zeros((5, 2)), y=np.arange(5) % 2)})
    images, labels = small_idx(9)
    with pytest.raises(DatasetError, match="too few samples"):
        parse_upload("idx", {"images": images, "labels": labels})


def test_single_class_is_refused() -> None:
    rows = [[i, i * 2, "only"] for i in range(12)]
    with pytest.raises(DatasetError, match="at least 2 classes"):
        parse_upload("csv", {"data": csv_bytes(["a", "b", "y"], rows)}, label_column="y")
    with pytest.raises(DatasetError, match="at least 2 classes"):
        parse_upload("npz", {"data": npz_bytes(X=np.zeros((12, 2)), y=np.zeros(12, dtype=int))})


def test_too_large_upload() -> None:
    data = flower_csv(30)
    with pytest.raises(DatasetTooLarge):
        parse_upload("csv", {"data": data}, label_column="species", max_bytes=len(data) - 1)
    assert issubclass(DatasetTooLarge, DatasetError)
    assert parse_upload("csv", {"data": data}, label_column="species", max_bytes=len(data)).x.shape == (30, 4)


def test_idx_count_mismatch() -> None:
    images, _ = small_idx(20)
    with pytest.raises(DatasetError, match=r"image count \(20\) and label count \(19\)"):
        parse_upload("idx", {"images": images, "labels": idx_labels(np.arange(19) % 3)})


def test_ragged_csv_and_unknown_kind_and_fields() -> None:
    data = b"a,b,y\n" + b"1,2,0\n" * 10 + b"1,0\n"
    with pytest.raises(DatasetError, match="line 12: 2 fields"):
        parse_upload("csv", {"data": data}, label_column="y")
    with pytest.raises(DatasetError, match="unknown upload kind"):
        parse_upload("parquet", {"data": data})
    with pytest.raises(DatasetError, match="file field"):
        parse_upload("idx", {"data": data})
    with pytest.raises(DatasetError, match="task"):
        parse_upload("csv", {"data": data}, label_column="y", task="ranking")
