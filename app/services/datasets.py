"""Datasets: the built-ins, and uploads stored once per owner by content hash."""

from __future__ import annotations

import difflib
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app import plugins
from app.core.config import Settings
from app.core.db import Database
from app.ml import data
from app.ml.uploads import parse_upload
from app.models import DatasetRecord
from app.services.errors import Conflict, InvalidInput, NotFound, TooLarge

UPLOAD_PREFIX = "dataset:"
_PATH_CHARACTERS = ("/", "\\", ":", "\x00")


def _mnist_dir(settings: Settings) -> Path | None:
    return settings.mnist_dir if settings.mnist_dir and settings.mnist_dir.is_dir() else None


@lru_cache(maxsize=16)
def _describe_builtin(ref: str, mnist_dir: Path | None) -> dict[str, Any]:
    return data.describe(data.load_builtin(ref, mnist_dir=mnist_dir))


def builtin_refs(settings: Settings) -> list[str]:
    return [r for r in data.BUILTINS if r != "builtin:mnist" or _mnist_dir(settings)]


def describe_dataset(db: Database, settings: Settings, *, owner: str, ref: str) -> dict[str, Any]:
    """What a study needs to know about a dataset; NotFound for unknown or another owner's, naming the
    datasets the caller can use (and, for builtin:mnist, the directory it was looked for in)."""
    if ref.startswith(plugins.PREFIX):
        return {"id": ref, "name": ref, "builtin": True, **data.describe(_plugin_dataset(ref))}
    if ref.startswith("builtin:"):
        if ref == "builtin:mnist":
            _check_mnist(settings)
        elif ref not in builtin_refs(settings):
            raise NotFound(_unknown(db, settings, owner, ref))
        try:
            described = _describe_builtin(ref, _mnist_dir(settings))
        except data.DatasetError as exc:  # an MNIST directory without usable IDX files
            raise NotFound(f"{ref}: {exc} (searched {settings.mnist_dir}, set by HPSEARCH_MNIST_DIR)") from exc
        return {"id": ref, "name": ref.removeprefix("builtin:"), "builtin": True, **described}
    record = _own_record(db, owner=owner, ref=ref)
    if record is None:
        raise NotFound(_unknown(db, settings, owner, ref))
    return _public(record)


def _check_mnist(settings: Settings) -> None:
    if settings.mnist_dir is None:
        raise NotFound("builtin:mnist needs a folder of MNIST IDX files: the server has none configured "
                       "(set HPSEARCH_MNIST_DIR)")
    if not settings.mnist_dir.is_dir():
        raise NotFound(f"builtin:mnist: no folder {settings.mnist_dir} (searched HPSEARCH_MNIST_DIR)")


def _unknown(db: Database, settings: Settings, owner: str, ref: str) -> str:
    """An unknown dataset's error: the closest valid name, and the names a spec's `dataset` may take for this
    owner, as they must be sent."""
    with db.read_session() as session:
        uploads = session.execute(select(DatasetRecord.id, DatasetRecord.name).where(DatasetRecord.owner == owner)
                                  .order_by(DatasetRecord.created_at).limit(20)).all()
    refs = builtin_refs(settings) + [UPLOAD_PREFIX + i for i, _ in uploads]
    shown = builtin_refs(settings) + [f"{UPLOAD_PREFIX}{i} ({name})" for i, name in uploads]
    bare = {r.partition(":")[2]: r for r in refs}  # the shared prefix would make every name look close
    close = difflib.get_close_matches(ref.partition(":")[2], list(bare), n=1)
    hint = f" (did you mean {bare[close[0]]}?)" if close else ""
    return f"unknown dataset {ref!r}{hint}; valid names: {', '.join(shown)}"


def _own_record(db: Database, *, owner: str, ref: str) -> DatasetRecord | None:
    with db.read_session() as session:
        record = session.get(DatasetRecord, ref.removeprefix(UPLOAD_PREFIX))
    return record if record is not None and record.owner == owner else None


def _public(record: DatasetRecord) -> dict[str, Any]:
    return {"id": UPLOAD_PREFIX + record.id, "name": record.name, "builtin": False, "kind": record.kind,
            "size_bytes": record.size_bytes, "created_at": record.created_at.isoformat(), **record.description}


def list_datasets(db: Database, settings: Settings, *, owner: str) -> list[dict[str, Any]]:
    out = [describe_dataset(db, settings, owner=owner, ref=ref) for ref in builtin_refs(settings)]
    for name in plugins.current().names(plugins.PluginKind.DATASET):
        try:
            out.append(describe_dataset(db, settings, owner=owner, ref=plugins.PREFIX + name))
        except NotFound:
            continue  # a plugin that fails to load is not offered; a study naming it is told why
    with db.read_session() as session:
        records = session.scalars(
            select(DatasetRecord).where(DatasetRecord.owner == owner).order_by(DatasetRecord.created_at)
        ).all()
    return out + [_public(r) for r in records]


def check_file_name(field: str, filename: str | None) -> None:
    """Refuse a client file name that is a path (a separator, a drive, a NUL, or only dots): names never
    build paths here, and a client that sends one is probing for code that would."""
    if not filename:
        return
    if any(c in filename for c in _PATH_CHARACTERS) or not filename.strip(". "):
        raise InvalidInput(("body", field), f"file name {filename[:100]!r}: give a plain name, not a path")


def upload_dataset(db: Database, settings: Settings, *, owner: str, kind: str, name: str,
                   files: dict[str, bytes], label_column: str | None, task: str | None,
                   feature_groups: dict[str, list[str]] | None) -> tuple[dict[str, Any], bool]:
    """Parse and validate an upload: its public description, and whether it is new.

    The same content is stored once per owner: uploading it again under the same name answers the stored
    record, under another name a Conflict naming it (a second name would silently alias the first).
    `size_bytes` is the bytes received, every file together.
    """
    try:
        ds = parse_upload(kind, files, label_column=label_column, feature_groups=feature_groups, task=task,
                          name=name, max_bytes=settings.max_upload_bytes)
    except data.DatasetTooLarge as exc:
        raise TooLarge(str(exc)) from exc
    except data.DatasetError as exc:
        raise InvalidInput(("body", "file"), str(exc)) from exc
    digest = data.content_hash(ds)
    with db.session() as session:
        existing = session.scalars(select(DatasetRecord).where(
            DatasetRecord.owner == owner, DatasetRecord.content_hash == digest)).first()
        if existing is not None:
            if existing.name != name:
                raise Conflict(f"this content is already uploaded as {UPLOAD_PREFIX}{existing.id} (name "
                               f"{existing.name!r}): each content is stored once; use that id in a spec")
            return _public(existing), False
    path = stored_path(settings, digest)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        data.save_dataset(ds, tmp)
        tmp.replace(path)
    # The id depends on the owner too: two owners uploading the same file get a dataset each.
    record_id = hashlib.sha256(f"{owner}\0{digest}".encode()).hexdigest()[:24]
    record = DatasetRecord(id=record_id, owner=owner, name=name, kind=kind, content_hash=digest,
                           size_bytes=sum(len(b) for b in files.values()), description=data.describe(ds))
    with db.session() as session:
        session.add(record)
    return _public(record), True


def stored_path(settings: Settings, digest: str) -> Path:
    assert settings.data_dir is not None
    return settings.data_dir / "datasets" / f"{digest}.npz"


def _plugin_dataset(ref: str) -> data.Dataset:
    """An enabled dataset plugin's data; NotFound (naming the enabled ones) or the plugin's failure otherwise."""
    try:
        dataset: data.Dataset = plugins.current().dataset(ref.removeprefix(plugins.PREFIX))
    except plugins.PluginError as exc:
        raise NotFound(str(exc)) from exc
    return dataset


def load_dataset(db: Database, settings: Settings, ref: str) -> data.Dataset:
    """The dataset a study names (already validated when the study was created)."""
    if ref.startswith(plugins.PREFIX):
        return _plugin_dataset(ref)
    if ref.startswith("builtin:"):
        return data.load_builtin(ref, mnist_dir=_mnist_dir(settings))
    with db.read_session() as session:
        record = session.get(DatasetRecord, ref.removeprefix(UPLOAD_PREFIX))
    if record is None:
        raise NotFound(f"dataset {ref!r} was deleted")
    return data.load_saved(stored_path(settings, record.content_hash))
