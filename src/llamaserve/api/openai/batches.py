"""OpenAI's Batch API: create a batch from an uploaded file, follow it, list, cancel. Its lines run on this
server's engines when they have room (serving/batches.py), at the batch price."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query, Request

from llamaserve.api.openai.files import batch_store, not_found, seconds
from llamaserve.api.platform.keys import CallerDep
from llamaserve.billing.models import Batch
from llamaserve.billing.pricing import format_credits
from llamaserve.billing.store import StoreError
from llamaserve.protocol.batches import BatchErrors, BatchList, BatchObject, BatchRequest, RequestCounts
from llamaserve.protocol.errors import invalid
from llamaserve.serving.batches import BatchRunner, input_lines

router = APIRouter()


def batch_object(batch: Batch) -> BatchObject:
    return BatchObject(
        id=batch.id,
        endpoint=batch.endpoint,
        errors=BatchErrors(data=batch.errors) if batch.errors else None,
        input_file_id=batch.input_file_id,
        completion_window=batch.completion_window,
        status=batch.status,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        created_at=seconds(batch.created_at) or 0,
        in_progress_at=seconds(batch.in_progress_at),
        expires_at=seconds(batch.expires_at),
        finalizing_at=seconds(batch.finalizing_at),
        completed_at=seconds(batch.completed_at),
        failed_at=seconds(batch.failed_at),
        expired_at=seconds(batch.expired_at),
        cancelling_at=seconds(batch.cancelling_at),
        cancelled_at=seconds(batch.cancelled_at),
        request_counts=RequestCounts(total=batch.total, completed=batch.completed, failed=batch.failed),
        metadata=batch.metadata_,
        cost=format_credits(batch.cost),
    )


@router.post("/v1/batches", response_model=BatchObject)
async def create_batch(body: BatchRequest, request: Request, caller: CallerDep) -> BatchObject:
    runner: BatchRunner = request.app.state.batches
    try:
        file = await runner.batches.file(caller.account_id, body.input_file_id, with_content=True)
    except StoreError as e:
        raise not_found(e, "input_file_id") from e
    if file.purpose != "batch":
        raise invalid(f"file {file.id} is a batch's {file.purpose}, not a batch input file", "input_file_id")
    lines = await asyncio.to_thread(input_lines, file.content, body.endpoint)
    window = dt.timedelta(seconds=runner.window_seconds)
    batch = await runner.batches.create_batch(
        caller.account_id,
        caller.key_id,
        body.endpoint,
        file.id,
        window,
        body.completion_window,
        body.metadata,
        lines,
    )
    runner.wake.set()
    return batch_object(batch)


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
    data = [batch_object(b) for b in batches[:limit]]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return BatchList(data=data, first_id=first, last_id=last, has_more=len(batches) > limit)


@router.post("/v1/batches/{batch_id}/cancel", response_model=BatchObject)
async def cancel_batch(batch_id: str, request: Request, caller: CallerDep) -> BatchObject:
    runner: BatchRunner = request.app.state.batches
    try:
        batch = await runner.batches.cancel(caller.account_id, batch_id)
    except StoreError as e:
        raise not_found(e, "batch_id") from e
    runner.wake.set()
    return batch_object(batch)
