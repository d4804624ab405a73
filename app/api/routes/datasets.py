from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from app.api.deps import CurrentOwner, DbDep, SettingsDep
from app.services import datasets
from app.services.errors import InvalidInput, TooLarge

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.get("")
def list_datasets(owner: CurrentOwner, db: DbDep, settings: SettingsDep) -> dict[str, Any]:
    data = datasets.list_datasets(db, settings, owner=owner)
    return {"data": data, "count": len(data)}


@router.get("/{dataset_id}")
def get_dataset(dataset_id: str, owner: CurrentOwner, db: DbDep, settings: SettingsDep) -> dict[str, Any]:
    ref = dataset_id if ":" in dataset_id else datasets.UPLOAD_PREFIX + dataset_id
    return datasets.describe_dataset(db, settings, owner=owner, ref=ref)


async def _read_limited(field: str, upload: UploadFile | None, limit: int) -> bytes | None:
    if upload is None:
        return None
    datasets.check_file_name(field, upload.filename)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"upload larger than {limit} bytes")
    return data


@router.post("", status_code=201)
async def upload_dataset(
    owner: CurrentOwner, db: DbDep, settings: SettingsDep, response: Response,
    kind: Annotated[Literal["csv", "npz", "idx"], Form()],
    name: Annotated[str, Form(min_length=1, max_length=200, pattern=r"^[\w .-]+$")] = "upload",
    label_column: Annotated[str | None, Form(max_length=200)] = None,
    task: Annotated[Literal["classification", "regression"] | None, Form()] = None,
    feature_groups: Annotated[str | None, Form(max_length=20000)] = None,
    file: Annotated[UploadFile | None, File()] = None,
    images: Annotated[UploadFile | None, File()] = None,
    labels: Annotated[UploadFile | None, File()] = None,
) -> dict[str, Any]:
    """CSV (label column named), NPZ (X, y; no pickle) or MNIST IDX (images + labels).

    Each content is stored once per owner: the same files again under the same name answer 200 with the
    stored dataset, under another name 409 naming it. `size_bytes` is the bytes received.
    """
    limit = settings.max_upload_bytes
    read = {"data": await _read_limited("file", file, limit),
            "images": await _read_limited("images", images, limit),
            "labels": await _read_limited("labels", labels, limit)}
    files = {k: v for k, v in read.items() if v is not None}
    needed = {"images", "labels"} if kind == "idx" else {"data"}
    if set(files) != needed:
        fields = "images and labels" if kind == "idx" else "file"
        raise InvalidInput(("body",), f"kind {kind} takes the file field(s) {fields}")
    groups = _parse_groups(feature_groups)
    # Parsing a large CSV takes seconds of CPU: in a worker thread, so other requests and streams go on.
    stored, created = await run_in_threadpool(datasets.upload_dataset, db, settings, owner=owner, kind=kind, name=name,
                                     files=files, label_column=label_column, task=task, feature_groups=groups)
    if not created:
        response.status_code = 200
    return stored


def _parse_groups(raw: str | None) -> dict[str, list[str]] | None:
    if raw is None:
        return None
    try:
        groups = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(("body", "feature_groups"), "must be JSON: {\"group\": [\"column\", ...]}") from exc
    if not isinstance(groups, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(c, str) for c in v) for k, v in groups.items()
    ):
        raise InvalidInput(("body", "feature_groups"), "must map group names to lists of column names")
    return groups
