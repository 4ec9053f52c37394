"""OpenAI's Files and Batch APIs: the file and batch objects, a batch's creation, and the lines of its files."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llamaserve.billing.models import Batch, File
from llamaserve.billing.pricing import format_credits
from llamaserve.protocol.validation import StoredText

MAX_METADATA_PAIRS = 16


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str = Field(description="batch (uploaded), or batch_output (a batch's output or error file)")
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class BatchRequest(BaseModel):
    """POST /v1/batches. `output_expires_after` is accepted and ignored: files here are kept until deleted."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: StoredText = Field(max_length=64)
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is None:
            return None
        if len(metadata) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs")
        if any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
            raise ValueError("keys are at most 64 characters, values at most 512")
        return metadata


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: str = Field(
        description="validating, in_progress, finalizing, completed, failed, expired, cancelling or cancelled"
    )
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    cost: str = Field(description="Credits charged for its lines so far (at the batch price), a decimal string.")


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


def file_object(file: File) -> FileObject:
    return FileObject(
        id=file.id,
        bytes=file.bytes,
        created_at=seconds(file.created_at) or 0,
        filename=file.filename,
        purpose=file.purpose,
    )


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


def seconds(t: dt.datetime | None) -> int | None:
    if t is None:
        return None
    return int((t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp())


def file_page(files: list[File], limit: int) -> FileList:
    """A page of files, from up to `limit` + 1 of them (one more says there are more)."""
    data = [file_object(f) for f in files[:limit]]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return FileList(data=data, first_id=first, last_id=last, has_more=len(files) > limit)


def batch_page(batches: list[Batch], limit: int) -> BatchList:
    """A page of batches, from up to `limit` + 1 of them (one more says there are more)."""
    data = [batch_object(b) for b in batches[:limit]]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return BatchList(data=data, first_id=first, last_id=last, has_more=len(batches) > limit)
