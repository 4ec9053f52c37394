"""Files and batch jobs in the account store: uploads, batches, and their lines from pending to done.

A line is claimed by one gateway at a time (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite has one writer) and
its output is written in the same transaction as its charge (`finish_line`), so a gateway killed mid-batch leaves
a line either done and charged or still to run, never both or neither: the lines of a gateway that stopped
beating go back to pending, and their holds to the hold sweep, uncharged.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, text, update

from llamaserve.billing.models import Batch, BatchLine, File, Gateway
from llamaserve.billing.store import Statements, Store, StoreError, Usage, settle_hold


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


class QuotaError(ValueError):
    """An account's files would hold more bytes than it may keep."""


@dataclass(frozen=True)
class NewLine:
    """A line of an input file, as `create_batch` stores it: a request to run, or one refused already (`output`
    is its error line)."""

    custom_id: str
    body: str  # JSON
    output: str | None = None
    tokens: int = 0  # what it may use, estimated (for the account's limit on queued batch tokens)


@dataclass(frozen=True)
class ClaimedLine:
    id: int
    batch_id: str
    custom_id: str
    body: str
    account_id: int
    key_id: int
    endpoint: str


@dataclass(frozen=True)
class Settlement:
    """A line's charge, written with its output: the hold to settle, what to charge, and the usage record."""

    hold_id: int
    charge: int
    usage: Usage
    key_id: int


class BatchStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    # --- files ----------------------------------------------------------------------------------------------
    async def create_file(
        self, account_id: int, purpose: str, filename: str, content: bytes, quota: int | None = None
    ) -> File:
        """A new file; with `quota`, QuotaError if the account's files would then hold more bytes."""
        if quota is not None:
            async with self.store.read() as s:
                held = await s.scalar(select(func.sum(File.bytes)).where(File.account_id == account_id)) or 0
            if held + len(content) > quota:
                raise QuotaError(f"the account's files hold {held} bytes; this one would take them past {quota}")
        file = File(
            id=new_file_id(),
            account_id=account_id,
            purpose=purpose,
            filename=filename,
            bytes=len(content),
            content=content,
            created_at=_now(),
        )
        async with self.store.write() as s:
            s.add(file)
        return file

    async def file(self, account_id: int, file_id: str, with_content: bool = False) -> File:
        """The account's file (StoreError if it has none of that id: another account's is as absent)."""
        columns = [File] if with_content else [File.id, File.purpose, File.filename, File.bytes, File.created_at]
        async with self.store.read() as s:
            row = (await s.execute(select(*columns).where(File.id == file_id, File.account_id == account_id))).first()
        if row is None:
            raise StoreError(f"No such File object: {file_id}")
        return row[0] if with_content else File(**row._asdict(), account_id=account_id)

    async def files(self, account_id: int, purpose: str | None, after: str | None, limit: int) -> list[File]:
        """The account's files, newest first (without their content)."""
        query = select(File.id, File.purpose, File.filename, File.bytes, File.created_at).where(
            File.account_id == account_id
        )
        if purpose is not None:
            query = query.where(File.purpose == purpose)
        async with self.store.read() as s:
            if after is not None:
                query = query.where(_before(File, await _position(s, File, account_id, after)))
            rows = (await s.execute(query.order_by(File.created_at.desc(), File.id.desc()).limit(limit))).all()
        return [File(**row._asdict(), account_id=account_id) for row in rows]

    async def delete_file(self, account_id: int, file_id: str) -> None:
        async with self.store.write() as s:
            deleted = await s.execute(delete(File).where(File.id == file_id, File.account_id == account_id))
            if deleted.rowcount == 0:  # type: ignore[attr-defined]
                raise StoreError(f"No such File object: {file_id}")

    # --- batches --------------------------------------------------------------------------------------------
    async def create_batch(
        self,
        account_id: int,
        key_id: int,
        endpoint: str,
        input_file_id: str,
        window: dt.timedelta,
        completion_window: str,
        metadata: dict[str, str] | None,
        lines: Sequence[NewLine],
        errors: list[dict[str, Any]] | None = None,
    ) -> Batch:
        """A batch in progress, its lines stored (those refused already, done and failed); with `errors`, a batch
        that failed validation, with no lines."""
        now = _now()
        failed, total = errors is not None, len(lines)
        if failed:
            lines = []  # a batch that failed validation keeps none of its lines
        refused = sum(1 for line in lines if line.output is not None)
        batch = Batch(
            id=f"batch_{secrets.token_hex(12)}",
            account_id=account_id,
            key_id=key_id,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            status="failed" if failed else "in_progress",
            metadata_=metadata,
            errors=errors,
            total=total,
            completed=0,
            failed=refused,
            cost=0,
            created_at=now,
            in_progress_at=None if failed else now,
            failed_at=now if failed else None,
            expires_at=now + window,
        )
        rows = [
            {
                "batch_id": batch.id,
                "line": i,
                "custom_id": line.custom_id,
                "body": line.body,
                "tokens": line.tokens,
                "status": "pending" if line.output is None else "done",
                "output": line.output,
                "failed": line.output is not None,
            }
            for i, line in enumerate(lines)
        ]
        async with self.store.write() as s:
            s.add(batch)
            await s.flush()
            if rows:
                await s.execute(BatchLine.__table__.insert(), rows)
        return batch

    async def queued_tokens(self, account_id: int) -> int:
        """The estimated tokens of the account's batch lines not yet done."""
        query = (
            select(func.sum(BatchLine.tokens))
            .join(Batch, Batch.id == BatchLine.batch_id)
            .where(Batch.account_id == account_id, BatchLine.status != "done")
        )
        async with self.store.read() as s:
            return int(await s.scalar(query) or 0)

    async def batch(self, account_id: int, batch_id: str) -> Batch:
        async with self.store.read() as s:
            batch = await s.scalar(select(Batch).where(Batch.id == batch_id, Batch.account_id == account_id))
        if batch is None:
            raise StoreError(f"No such Batch object: {batch_id}")
        return batch

    async def batches(self, account_id: int, after: str | None, limit: int) -> list[Batch]:
        """The account's batches, newest first."""
        query = select(Batch).where(Batch.account_id == account_id)
        async with self.store.read() as s:
            if after is not None:
                query = query.where(_before(Batch, await _position(s, Batch, account_id, after)))
            return list(await s.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)))

    async def cancel(self, account_id: int, batch_id: str) -> Batch:
        """Stop a batch: its pending lines are answered `batch_cancelled`; it is cancelled once the lines running
        now have finished. A batch that has ended already is returned as it is."""
        now = _now()
        async with self.store.write() as s:
            batch = await s.scalar(
                select(Batch).where(Batch.id == batch_id, Batch.account_id == account_id).with_for_update()
            )
            if batch is None:
                raise StoreError(f"No such Batch object: {batch_id}")
            if batch.status in ("validating", "in_progress"):
                batch.failed += await _answer_pending(s, batch_id, "batch_cancelled", CANCELLED)
                batch.status, batch.cancelling_at = "cancelling", now
        return await self.batch(account_id, batch_id)

    # --- running lines --------------------------------------------------------------------------------------
    async def claim(self, owner: str, limit: int) -> list[ClaimedLine]:
        """Up to `limit` pending lines of batches in progress, oldest first, now running as `owner`'s."""
        if limit <= 0:
            return []
        picked = (
            select(BatchLine.id)
            .join(Batch, Batch.id == BatchLine.batch_id)
            .where(BatchLine.status == "pending", Batch.status == "in_progress")
            .order_by(BatchLine.id)
            .limit(limit)
            .with_for_update(of=BatchLine, skip_locked=True)
        )
        async with self.store.write() as s:
            ids = list(await s.scalars(picked))
            if not ids:
                return []
            await s.execute(update(BatchLine).where(BatchLine.id.in_(ids)).values(status="running", owner=owner))
            rows = (
                await s.execute(
                    select(
                        BatchLine.id,
                        BatchLine.batch_id,
                        BatchLine.custom_id,
                        BatchLine.body,
                        Batch.account_id,
                        Batch.key_id,
                        Batch.endpoint,
                    )
                    .join(Batch, Batch.id == BatchLine.batch_id)
                    .where(BatchLine.id.in_(ids))
                    .order_by(BatchLine.id)
                )
            ).all()
        return [ClaimedLine(*row) for row in rows]

    async def finish_line(
        self, line: ClaimedLine, owner: str, output: str, failed: bool, settlement: Settlement | None
    ) -> bool:
        """Write a line's output and its charge in one transaction; False (and nothing written) if the line is
        no longer this owner's to finish (it was handed to another gateway meanwhile)."""
        return await self.store.transaction(_finish_line, line.id, line.batch_id, owner, output, failed, settlement)

    async def release_orphans(self, owner: str, dead_after: dt.timedelta) -> int:
        """Lines running for gateways that stopped beating go back to pending (their holds are released by the
        hold sweep, uncharged): they run again, once."""
        alive = select(Gateway.id).where(Gateway.heartbeat_at >= _now() - dead_after)
        orphaned = BatchLine.status == "running", BatchLine.owner != owner, BatchLine.owner.not_in(alive)
        async with self.store.write() as s:
            result = await s.execute(update(BatchLine).where(*orphaned).values(status="pending", owner=None))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def requeue(self, owner: str, line_id: int | None = None) -> None:
        """The lines running as `owner`'s (or only the line `line_id`) back to pending: a gateway stopping, or a
        line it could not finish."""
        running = [BatchLine.status == "running", BatchLine.owner == owner]
        if line_id is not None:
            running.append(BatchLine.id == line_id)
        async with self.store.write() as s:
            await s.execute(update(BatchLine).where(*running).values(status="pending", owner=None))

    async def expire(self) -> int:
        """Batches past their window: pending lines answered `batch_expired`; the batch ends once its running
        lines have finished."""
        now = _now()
        async with self.store.write() as s:
            due = list(await s.scalars(select(Batch).where(Batch.status == "in_progress", Batch.expires_at <= now)))
            for batch in due:  # finalizing until its running lines have finished
                batch.failed += await _answer_pending(s, batch.id, "batch_expired", EXPIRED)
                batch.status, batch.expired_at, batch.finalizing_at = "finalizing", now, now
        return len(due)

    async def finalize(self) -> list[str]:
        """Batches whose every line is done get their output and error files and end: completed, cancelled or
        expired. Returns their ids."""
        ending = ("in_progress", "cancelling", "finalizing")
        running = select(BatchLine.id).where(BatchLine.batch_id == Batch.id, BatchLine.status != "done").exists()
        async with self.store.read() as s:
            ready = list(await s.scalars(select(Batch.id).where(Batch.status.in_(ending), ~running)))
        return [batch_id for batch_id in ready if await self._finalize(batch_id)]

    async def _finalize(self, batch_id: str) -> bool:
        now = _now()
        async with self.store.write() as s:
            batch = await s.scalar(select(Batch).where(Batch.id == batch_id).with_for_update())
            if batch is None or batch.status not in ("in_progress", "cancelling", "finalizing"):
                return False  # another gateway finalized it
            lines = (
                await s.execute(
                    select(BatchLine.output, BatchLine.failed)
                    .where(BatchLine.batch_id == batch_id)
                    .order_by(BatchLine.line)
                )
            ).all()
            outputs = [o.encode() + b"\n" for o, failed in lines if o is not None and not failed]
            errors = [o.encode() + b"\n" for o, failed in lines if o is not None and failed]
            for content, kind in ((outputs, "output"), (errors, "error")):
                if not content:
                    continue
                file = File(
                    id=new_file_id(),
                    account_id=batch.account_id,
                    purpose="batch_output",
                    filename=f"{batch_id}_{kind}.jsonl",
                    bytes=sum(len(c) for c in content),
                    content=b"".join(content),
                    created_at=now,
                )
                s.add(file)
                if kind == "output":
                    batch.output_file_id = file.id
                else:
                    batch.error_file_id = file.id
            batch.finalizing_at = batch.finalizing_at or now
            if batch.status == "cancelling":
                batch.status, batch.cancelled_at = "cancelled", now
            elif batch.status == "finalizing":  # expired
                batch.status = "expired"
            else:
                batch.status, batch.completed_at = "completed", now
        return True


CANCELLED = "This request was not run: its batch was cancelled."
EXPIRED = "This request could not be executed before the completion window expired."


async def _answer_pending(s: Any, batch_id: str, code: str, message: str) -> int:
    """Mark a batch's pending lines done and failed with an `error` (no response), in one statement run for
    every line; returns how many."""
    pending = (
        await s.execute(
            select(BatchLine.id, BatchLine.custom_id).where(
                BatchLine.batch_id == batch_id, BatchLine.status == "pending"
            )
        )
    ).all()
    if pending:
        error = {"code": code, "message": message}
        answers = [
            {"id": line_id, "status": "done", "failed": True, "output": result_line(custom_id, error=error)}
            for line_id, custom_id in pending
        ]
        await s.execute(update(BatchLine), answers)  # by primary key
    return len(pending)


def result_line(
    custom_id: str,
    response: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
    request_id: str | None = None,
) -> str:
    """A line of a batch's output or error file, OpenAI's shape: the response a request got, or the error that
    kept it from getting one."""
    request_id = request_id or f"batch_req_{secrets.token_hex(12)}"
    line = {"id": request_id, "custom_id": custom_id, "response": response, "error": error}
    return json.dumps(line, ensure_ascii=False)


_LINE_DONE = text(
    "UPDATE batch_lines SET status = 'done', output = :output, failed = :failed "
    "WHERE id = :id AND status = 'running' AND owner = :owner"
)
_COUNT_LINE = text(
    "UPDATE batches SET completed = completed + :completed, failed = failed + :failed, cost = cost + :cost "
    "WHERE id = :batch_id"
)


def _finish_line(
    run: Statements, line_id: int, batch_id: str, owner: str, output: str, failed: bool, settlement: Settlement | None
) -> bool:
    if run(_LINE_DONE, {"id": line_id, "owner": owner, "output": output, "failed": failed}).rowcount == 0:
        return False
    charge = 0
    if settlement is not None:
        settle_hold(run, settlement.hold_id, settlement.charge, settlement.usage, settlement.key_id)
        charge = settlement.charge
    counts = {"completed": int(not failed), "failed": int(failed), "cost": charge, "batch_id": batch_id}
    run(_COUNT_LINE, counts)
    return True


async def _position(s: Any, table: Any, account_id: int, after: str) -> tuple[dt.datetime, str]:
    """Where the object `after` sits in its account's list (for `after` pagination); 404 if it is not there."""
    row = (
        await s.execute(select(table.created_at, table.id).where(table.id == after, table.account_id == account_id))
    ).first()
    if row is None:
        raise StoreError(f"after: no such object {after!r}")
    return row[0], row[1]


def _before(table: Any, position: tuple[dt.datetime, str]) -> Any:
    created_at, object_id = position
    return (table.created_at < created_at) | ((table.created_at == created_at) & (table.id < object_id))
