"""OpenAI's Batch API: create a batch from an uploaded file, follow it, list, cancel. Its lines run on this
server's engines when they have room (serving/batches.py), at the batch price."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from llamaserve.api.openai.calls import call_of
from llamaserve.api.openai.files import batch_store, not_found
from llamaserve.api.openai.idempotency import idempotent
from llamaserve.api.platform.keys import CallerDep
from llamaserve.billing.store import Caller, StoreError
from llamaserve.protocol.batches import BatchList, BatchObject, BatchRequest, batch_object, batch_page
from llamaserve.protocol.errors import invalid
from llamaserve.serving.batches import BatchRunner, input_lines
from llamaserve.serving.reply import Reply

router = APIRouter()


@router.post("/v1/batches", response_model=BatchObject)
async def create_batch(body: BatchRequest, request: Request, caller: CallerDep) -> Response:
    return await idempotent(request, call_of(request, caller), lambda: _create(body, request, caller))


async def _create(body: BatchRequest, request: Request, caller: Caller) -> Reply:
    runner: BatchRunner = request.app.state.batches
    try:
        file = await runner.batches.file(caller.account_id, body.input_file_id, with_content=True)
    except StoreError as e:
        raise not_found(e, "input_file_id") from e
    if file.purpose != "batch":
        raise invalid(f"file {file.id} is a batch's {file.purpose}, not a batch input file", "input_file_id")
    lines = await asyncio.to_thread(input_lines, file.content, body.endpoint)
    window = dt.timedelta(seconds=runner.window_seconds)
    queued, adding = await runner.batches.queued_tokens(caller.account_id), sum(line.tokens for line in lines)
    errors = None
    if queued + adding > runner.max_queued_tokens:  # as OpenAI: the batch is made, and fails validation
        message = (
            f"Enqueued token limit reached: this batch's requests may use about {adding} tokens and the account's "
            f"batches not yet done {queued}, of {runner.max_queued_tokens} allowed; wait for them to finish"
        )
        errors = [{"code": "token_limit_exceeded", "message": message, "param": None, "line": None}]
    batch = await runner.batches.create_batch(
        caller.account_id,
        caller.key_id,
        body.endpoint,
        file.id,
        window,
        body.completion_window,
        body.metadata,
        lines,
        errors,
    )
    runner.wake.set()
    return Reply({}, body=batch_object(batch).model_dump())


@router.get("/v1/batches/{batch_id}", response_model=BatchObject)
async def get_batch(batch_id: str, request: Request, caller: CallerDep) -> BatchObject:
    try:
        return batch_object(await batch_store(request).batch(caller.account_id, batch_id))
    except StoreError as e:
        raise not_found(e, "batch_id") from e


@router.get("/v1/batches", response_model=BatchList)
async def list_batches(
    request: Request,
    caller: CallerDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    try:
        batches = await batch_store(request).batches(caller.account_id, after, limit + 1)
    except StoreError as e:
        raise not_found(e, "after") from e
    return batch_page(batches, limit)


@router.post("/v1/batches/{batch_id}/cancel", response_model=BatchObject)
async def cancel_batch(batch_id: str, request: Request, caller: CallerDep) -> BatchObject:
    runner: BatchRunner = request.app.state.batches
    try:
        batch = await runner.batches.cancel(caller.account_id, batch_id)
    except StoreError as e:
        raise not_found(e, "batch_id") from e
    runner.wake.set()
    return batch_object(batch)
