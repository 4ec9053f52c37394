"""OpenAI's Files API, for batch input files and the output and error files batches make: upload, list, get,
download, delete. An account sees only its own files; another's are as absent (404)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import Response

from llamaserve.api.openai.calls import call_of
from llamaserve.api.openai.idempotency import idempotent
from llamaserve.api.platform.keys import CallerDep
from llamaserve.billing.batches import BatchStore, QuotaError
from llamaserve.billing.store import StoreError
from llamaserve.protocol.batches import FileDeleted, FileList, FileObject, file_object, file_page
from llamaserve.protocol.errors import APIError, invalid
from llamaserve.serving.batches import jsonl_objects
from llamaserve.serving.reply import Reply

router = APIRouter()
FILES_QUOTA = 1 << 30  # bytes an account's files may hold in the store (outputs included)


def batch_store(request: Request) -> BatchStore:
    return request.app.state.batches.batches


def not_found(e: StoreError, param: str) -> APIError:
    return APIError(404, str(e), param=param, code="not_found")


@router.post("/v1/files", response_model=FileObject, summary="Upload a batch input file (JSONL)")
async def upload_file(
    request: Request, caller: CallerDep, file: UploadFile, purpose: Annotated[str, Form(max_length=32)]
) -> Response:
    if purpose != "batch":
        raise invalid(f"purpose {purpose!r} is not kept here: upload batch input files (purpose 'batch')", "purpose")
    content = await file.read()
    name = (file.filename or "upload.jsonl")[:255]

    async def upload() -> Reply:
        await asyncio.to_thread(jsonl_objects, content)  # a batch file or a 400 now, not at its batch's creation
        try:
            stored = await batch_store(request).create_file(caller.account_id, purpose, name, content, FILES_QUOTA)
        except QuotaError as e:
            raise invalid(f"{e}: delete files you no longer need", "file", code="files_quota_exceeded") from e
        return Reply({}, body=file_object(stored).model_dump())

    identity = hashlib.sha256(content).hexdigest().encode() + b"\n" + purpose.encode() + b"\n" + name.encode()
    return await idempotent(request, call_of(request, caller), upload, identity)


@router.get("/v1/files", response_model=FileList)
async def list_files(
    request: Request,
    caller: CallerDep,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
) -> FileList:
    try:
        files = await batch_store(request).files(caller.account_id, purpose, after, limit + 1)
    except StoreError as e:
        raise not_found(e, "after") from e
    return file_page(files, limit)


@router.get("/v1/files/{file_id}", response_model=FileObject)
async def get_file(file_id: str, request: Request, caller: CallerDep) -> FileObject:
    try:
        return file_object(await batch_store(request).file(caller.account_id, file_id))
    except StoreError as e:
        raise not_found(e, "file_id") from e


@router.get("/v1/files/{file_id}/content", response_class=Response, summary="A file's content")
async def file_content(file_id: str, request: Request, caller: CallerDep) -> Response:
    try:
        file = await batch_store(request).file(caller.account_id, file_id, with_content=True)
    except StoreError as e:
        raise not_found(e, "file_id") from e
    return Response(file.content, media_type="application/jsonl")


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, request: Request, caller: CallerDep) -> FileDeleted:
    try:
        await batch_store(request).delete_file(caller.account_id, file_id)
    except StoreError as e:
        raise not_found(e, "file_id") from e
    return FileDeleted(id=file_id)
