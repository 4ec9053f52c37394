"""Batch jobs: each gateway runs the lines of batches in progress through the same serving path as live
requests (validation, the key's model allowance, admission, the model's backend), at the batch price, a few at a
time, and writes each line's output with its charge in one transaction.

The scheduling rule: a gateway runs at most `concurrency` lines at once (default: half its engine's slots), so
live requests always keep the other slots; on the local engine the lines are background sequences, which sit out
every step while a live request runs or has just run (engine/scheduler.py). Batch lines count against no live
rate limit. Lines are claimed from the store, so replicas share the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from llamaserve.billing.batches import BatchStore, ClaimedLine, NewLine, Settlement, result_line
from llamaserve.billing.store import AuthError
from llamaserve.protocol.chat import DEFAULT_CHAT_MAX_TOKENS, ChatCompletionRequest
from llamaserve.protocol.completions import DEFAULT_COMPLETION_MAX_TOKENS, CompletionRequest
from llamaserve.protocol.errors import APIError, ErrorDetail, ErrorResponse, invalid, validation_detail
from llamaserve.serving.admission import ANONYMOUS, DEAD_AFTER, Call, Platform, never_disconnects
from llamaserve.serving.directory import ModelDirectory
from llamaserve.serving.reply import run_after

log = logging.getLogger(__name__)
IDLE_POLL_SECONDS = 1.0  # how often an idle gateway looks for work (new batches of this gateway wake it at once)
ORPHAN_SWEEP_SECONDS = 5.0  # how often lines of gateways that stopped are put back to pending

MAX_LINES = 50_000  # requests in one batch (OpenAI's limit)
MAX_CUSTOM_ID = 512
DEFAULT_MAX_TOKENS = {"/v1/chat/completions": DEFAULT_CHAT_MAX_TOKENS, "/v1/completions": DEFAULT_COMPLETION_MAX_TOKENS}
REQUESTS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}


@dataclass
class BatchRunner:
    platform: Platform
    batches: BatchStore
    models: ModelDirectory
    concurrency: int  # lines this gateway runs at once
    discount: float  # off the models' prices
    window_seconds: float = 24 * 3600  # a batch's completion window ("24h"; shorter for tests or small sites)
    max_queued_tokens: int = 20_000_000  # estimated tokens an account's batch lines not yet done may add up to
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    running: dict[int, tuple[asyncio.Task[None], Call]] = field(default_factory=dict)  # by line id
    _swept_at: float = 0.0

    @property
    def owner(self) -> str:
        return self.platform.store.instance

    async def run(self) -> None:
        """Claim and run lines, end batches whose lines are done, expire those past their window; forever."""
        while True:
            try:
                await self._step()
            except Exception as e:  # the database out of reach: try again at the next step
                log.warning("batch runner: %s", e)
            try:
                await asyncio.wait_for(self.wake.wait(), IDLE_POLL_SECONDS)
            except TimeoutError:
                pass
            self.wake.clear()

    async def _step(self) -> None:
        if time.monotonic() - self._swept_at > ORPHAN_SWEEP_SECONDS:
            self._swept_at = time.monotonic()
            if released := await self.batches.release_orphans(self.owner, DEAD_AFTER):
                log.warning("%d batch lines of gateways that stopped go back to pending", released)
        await self.batches.expire()
        for batch_id in await self.batches.finalize():
            log.info("batch %s finished", batch_id)
        for line in await self.batches.claim(self.owner, self.concurrency - len(self.running)):
            call = Call(
                caller=ANONYMOUS,  # until the line's key is checked
                request_id=f"batch_req_{secrets.token_hex(12)}",
                disconnected=never_disconnects,
                batch_discount=self.discount,
            )
            task = asyncio.get_running_loop().create_task(self._run_line(line, call))
            self.running[line.id] = (task, call)
            task.add_done_callback(lambda _, line_id=line.id: self._ended(line_id))

    def _ended(self, line_id: int) -> None:
        self.running.pop(line_id, None)
        self.wake.set()

    async def _run_line(self, line: ClaimedLine, call: Call) -> None:
        settlement = None
        try:
            status, body = await self._answer(line, call)
            settlement = await self._settlement(call, line)
            output = output_line(line.custom_id, status, body, call.request_id)
            if await self.batches.finish_line(line, self.owner, output, status != 200, settlement):
                return
        except Exception:  # the database out of reach, or a bug: the line runs again
            log.exception(
                "batch line %d of %s could not be finished here; it goes back to pending", line.id, line.batch_id
            )
            with contextlib.suppress(Exception):
                await self.batches.requeue(self.owner, line.id)
        if settlement is not None:  # its output not written (or the line no longer ours): nothing charged
            with contextlib.suppress(Exception):
                await self.platform.store.settle(settlement.hold_id, 0, None, settlement.key_id)

    async def _answer(self, line: ClaimedLine, call: Call) -> tuple[int, dict[str, Any]]:
        """The line's response: status and body, as a live request would have had them."""
        try:
            call.caller = await self.platform.store.caller_of_key(line.key_id)
            request = await asyncio.to_thread(_request, line.endpoint, line.body)
            serving = self.models.resolve(request.model, call.caller)  # type: ignore[attr-defined]
            call.batch_discount = self._discount(serving.id)
            if line.endpoint == "/v1/chat/completions":
                reply = await serving.chat(request, call)  # type: ignore[arg-type]
            else:
                reply = await serving.completion(request, call)  # type: ignore[arg-type]
            await run_after(reply.after)
            assert reply.body is not None
            return 200, reply.body
        except AuthError as e:
            detail = ErrorDetail(message=str(e), type="invalid_request_error", code=e.code)
            return e.status, ErrorResponse(error=detail).model_dump()
        except APIError as e:
            return e.status, e.body.model_dump()

    def _discount(self, model_id: str) -> float:
        """The model's batch discount (its registry entry's), else the server's."""
        spec = self.models.registry.resolve(model_id) if self.models.registry is not None else None
        return spec.batch_discount if spec is not None and spec.batch_discount is not None else self.discount

    async def _settlement(self, call: Call, line: ClaimedLine) -> Settlement | None:
        """The line's charge, once its generation has ended (None: it held nothing)."""
        admission = call.admission
        if admission is None or not admission.hold_id or admission.handed_over is None:
            return None
        charge, usage = await admission.handed_over
        return Settlement(admission.hold_id, charge, usage, call.caller.key_id)

    async def stop(self) -> None:
        """Stop the lines running here: their holds released uncharged, the lines back to pending (another
        gateway, or this one restarted, runs them again)."""
        tasks = [task for task, _ in self.running.values()]
        calls = [call for _, call in self.running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for call in calls:
            admission = call.admission
            if admission is not None and admission.hold_id:
                await self.platform.store.settle(admission.hold_id, 0, None, call.caller.key_id)
        await self.batches.requeue(self.owner)


def jsonl_objects(content: bytes, param: str = "file") -> list[dict[str, Any]]:
    """A batch input file's lines as JSON objects (blank lines skipped); 400 naming the first line that is not
    one, or when there are more than MAX_LINES. CPU-bound: run it off the event loop."""
    objects = []
    for number, raw in enumerate(content.split(b"\n"), 1):
        if not raw.strip():
            continue
        if len(objects) == MAX_LINES:
            raise invalid(f"a batch file may hold at most {MAX_LINES} requests", param, code="too_many_lines")
        try:
            line = json.loads(raw)
        except ValueError:  # bad JSON, or bytes that are not UTF-8
            line = None
        if not isinstance(line, dict):
            raise invalid(f"line {number} is not a JSON object: a batch file holds one request a line", param)
        objects.append(line)
    if not objects:
        raise invalid("the file holds no requests", param, code="empty_file")
    return objects


def input_lines(content: bytes, endpoint: str) -> list[NewLine]:
    """An input file's requests for a batch to `endpoint`. A line whose method, url or body cannot be a request
    there fails alone (its 400 in the error file); a file whose lines cannot be told apart (no string
    `custom_id`, one used twice) is refused whole: 400. CPU-bound: run it off the event loop."""
    lines, seen = [], set()
    for number, line in enumerate(jsonl_objects(content, "input_file_id"), 1):
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            raise invalid(
                f"request {number} of the input file has no custom_id (a string of 1 to {MAX_CUSTOM_ID} characters)",
                "input_file_id",
            )
        if custom_id in seen:
            raise invalid(f"custom_id {custom_id!r} is used twice in the input file", "input_file_id")
        seen.add(custom_id)
        body = line.get("body")
        refusal = None
        if line.get("method") != "POST":
            refusal = invalid("method must be POST", "method")
        elif line.get("url") != endpoint:
            refusal = invalid(f"url must be the batch's endpoint, {endpoint}", "url")
        elif not isinstance(body, dict):
            refusal = invalid("body must be a JSON object: the request", "body")
        if refusal is None:
            text = json.dumps(body, ensure_ascii=False)
            lines.append(NewLine(custom_id, text, tokens=_estimate(text, body, endpoint)))
        else:
            lines.append(NewLine(custom_id, "{}", output_line(custom_id, refusal.status, refusal.body.model_dump())))
    return lines


def _estimate(text: str, body: dict[str, Any], endpoint: str) -> int:
    """The tokens a line may use, before it is rendered: its body's bytes / 4 for the prompt, plus max_tokens
    (the endpoint's default when absent) for each of its n choices."""
    default = DEFAULT_MAX_TOKENS[endpoint]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default))
    n = body.get("n", 1)
    out = (max_tokens if isinstance(max_tokens, int) else default) * (n if isinstance(n, int) and n > 0 else 1)
    return len(text.encode()) // 4 + max(0, out)


def output_line(custom_id: str, status: int, body: dict[str, Any], request_id: str | None = None) -> str:
    """A line of a batch's output (status 200) or error file: the response a live request would have had."""
    request_id = request_id or f"batch_req_{secrets.token_hex(12)}"
    response = {"status_code": status, "request_id": request_id, "body": body}
    return result_line(custom_id, response=response, request_id=request_id)


def _request(endpoint: str, body: str) -> BaseModel:
    """A line's body as its endpoint's request, validated as a live request's is (400 naming the parameter)."""
    try:
        request = REQUESTS[endpoint].model_validate(json.loads(body), from_attributes=True)
    except ValidationError as e:
        detail = validation_detail(list(e.errors(include_url=False)))
        raise APIError(400, detail.message, type=detail.type, param=detail.param, code=detail.code) from None
    if getattr(request, "stream", False):
        raise invalid("a batch line cannot stream: leave `stream` out (each line is answered whole)", "stream")
    return request
