"""The engine: a step loop on its own thread, and the asyncio side that request handlers talk to.

Each step: take new requests and cancellations, admit waiting sequences into free slots, build one batch (a
token for each generating sequence plus prompt chunks), run one llama_decode, sample every sequence whose
logits came out, and hand the new text to the requests' queues on the event loop. ctypes releases the GIL in
llama_decode, so the HTTP side keeps serving while the model computes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from llamaserve.engine.llama import Batch, ContextConfig, LlamaModel
from llamaserve.engine.logprobs import TokenLogprob, token_logprob
from llamaserve.engine.sampling import GrammarError, Sampler, SamplingParams
from llamaserve.engine.scheduler import Scheduled, Scheduler
from llamaserve.engine.sequence import Output, Sequence

log = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """The waiting queue is full."""


class InvalidPrompt(ValueError):
    """A prompt the engine cannot run; `code` says why (empty_prompt, context_length_exceeded)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class EngineStats:
    steps: int = 0
    sequences_finished: int = 0
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0
    generated_tokens: int = 0
    max_batch_sequences: int = 0  # the most sequences one llama_decode ever carried
    max_batch_generating: int = 0  # the most sequences that got a new token from one llama_decode
    running: int = 0
    waiting: int = 0


@dataclass
class RequestHandle:
    """The asyncio side of one request: n choices streaming Outputs into one queue."""

    id: str
    prompt_tokens: list[int]
    n: int
    engine: Engine
    queue: asyncio.Queue[Output] = field(default_factory=asyncio.Queue)
    sequences: list[Sequence] = field(default_factory=list)
    completion_tokens: int = 0
    finished_choices: int = 0
    failed: bool = False  # a choice ended with an engine error
    closed: bool = False
    on_close: Callable[[], None] | None = None  # called once, when the request gives its place back

    @property
    def cached_tokens(self) -> int:
        return self.sequences[0].cached_tokens if self.sequences else 0

    @property
    def done(self) -> bool:
        return self.finished_choices >= self.n

    async def outputs(self) -> AsyncIterator[Output]:
        """Outputs of every choice, in the order produced, until all have finished. Leaving early (a client
        that went away) cancels the rest."""
        try:
            while not self.done:
                out = await self.queue.get()
                self.completion_tokens += len(out.token_ids)
                self.failed = self.failed or out.error is not None
                if out.finish_reason is not None:
                    self.finished_choices += 1
                yield out
        finally:
            self.close()

    def close(self) -> None:
        """Give the request's place back; cancels choices still generating. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if not self.done:
            self.engine.abort(self)
        self.engine.outstanding -= self.n
        if self.on_close is not None:
            self.on_close()


class Engine:
    def __init__(self, model: LlamaModel, max_waiting: int = 1024) -> None:
        self.model = model
        self.config: ContextConfig = model.config
        self.max_model_len = min(model.n_ctx_seq, model.n_ctx_train or model.n_ctx_seq)
        self.max_waiting = max_waiting
        self.stats = EngineStats()
        self.outstanding = 0  # sequences submitted and not yet consumed (touched on the event loop only)
        self._scheduler = Scheduler(model, self.config.n_seq_max)
        self._batch = Batch(self.config.n_batch)
        self._inbox: queue.SimpleQueue[tuple[str, RequestHandle]] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llamaserve-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def n_slots(self) -> int:
        return self.config.n_seq_max

    # --- asyncio side ---------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))  # type: ignore[arg-type]
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def submit(self, prompt: list[int], params: SamplingParams, n: int = 1, request_id: str = "") -> RequestHandle:
        """Queue a request of n choices; iterate `handle.outputs()` for its text. Call on the event loop."""
        if not prompt:
            raise InvalidPrompt("the prompt is empty: give at least one token", "empty_prompt")
        if len(prompt) >= self.max_model_len:
            raise InvalidPrompt(
                f"the prompt is {len(prompt)} tokens; this model's context is {self.max_model_len} tokens "
                "and leaves no room to generate",
                "context_length_exceeded",
            )
        if not self.alive:
            raise EngineOverloaded("the engine has stopped; see the server log")
        if self.outstanding + n > self.n_slots + self.max_waiting:
            raise EngineOverloaded(
                f"the engine is at capacity ({self.n_slots} running, {self.max_waiting} queued); retry shortly"
            )
        handle = RequestHandle(request_id or f"req-{next(self._ids)}", list(prompt), n, self)
        max_new = min(params.max_tokens, self.max_model_len - len(prompt))
        handle.sequences = [Sequence(handle, i, prompt, params, max_new) for i in range(n)]
        self.outstanding += n
        self._inbox.put(("add", handle))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        self._inbox.put(("abort", handle))

    def _deliver(self, outputs: list[tuple[RequestHandle, Output]]) -> None:
        for handle, out in outputs:
            handle.queue.put_nowait(out)

    # --- engine thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        sched = self._scheduler
        try:
            while not self._stop.is_set():
                self._take_commands(block=not sched.running)
                sched.admit()
                plan = sched.fill(self._batch, self.config.n_batch)
                if plan:
                    self._step(plan)
                self.stats.running, self.stats.waiting = len(sched.running), len(sched.waiting)
        except Exception:  # a bug here must not leave every client hanging
            log.exception("engine loop crashed")
            self._fail_all("internal engine error")

    def _take_commands(self, block: bool) -> None:
        try:
            cmd, handle = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if cmd == "add":
                self._add(handle)
            elif cmd == "abort":
                for seq in handle.sequences:
                    if seq.finish_reason is None:
                        seq.finish_reason = "abort"
                        self._scheduler.release(seq)
            try:
                cmd, handle = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, handle: RequestHandle) -> None:
        try:
            for seq in handle.sequences:
                seq.sampler = Sampler(self.model, seq.params, seed_offset=seq.choice)
                seq.sampler.accept_prompt(seq.prompt)
        except GrammarError as e:
            self._fail(handle.sequences, str(e))  # frees the samplers made so far
            return
        self._scheduler.waiting.extend(handle.sequences)

    def _step(self, plan: list[Scheduled]) -> None:
        rc = self.model.decode(self._batch)
        if rc != 0:
            self._fail([s.seq for s in plan], f"llama_decode failed with code {rc}")
            return
        stats = self.stats
        stats.steps += 1
        stats.max_batch_sequences = max(stats.max_batch_sequences, len(plan))
        outputs: list[tuple[RequestHandle, Output]] = []
        sampled = 0
        for item in plan:
            seq = item.seq
            slot = seq.slot
            assert slot is not None and seq.sampler is not None
            if item.start < seq.prompt_len:
                stats.prompt_tokens_computed += min(item.count, seq.prompt_len - item.start)
                if seq.prompt_logprobs is not None:
                    self._prompt_logprobs(seq, item)
            slot.tokens.extend(seq.tokens[item.start : item.start + item.count])
            if item.logits_index < 0:
                continue
            if seq.n_generated == 0:
                stats.prompt_tokens_cached += seq.cached_tokens
            sampled += 1
            token = seq.sampler.sample(self.model, item.logits_index)
            n_top = seq.params.logprobs
            logprob = None if n_top is None else token_logprob(self.model, item.logits_index, token, n_top)
            seq.append(token, self.model, logprob)
            out = seq.take_output()
            if out is not None:
                outputs.append((seq.handle, out))
            if seq.finish_reason is not None:
                self._scheduler.release(seq)
                stats.sequences_finished += 1
        stats.generated_tokens += sampled
        stats.max_batch_generating = max(stats.max_batch_generating, sampled)
        self._send(outputs)

    def _prompt_logprobs(self, seq: Sequence, item: Scheduled) -> None:
        """Logprobs of the prompt tokens this chunk predicts: the logits at position p score token p + 1."""
        assert seq.prompt_logprobs is not None
        n_top = seq.params.prompt_logprobs or 0
        if item.start == 0:
            seq.prompt_logprobs.append(TokenLogprob(seq.tokens[0], None))
        for pos in range(item.start, min(item.start + item.count, seq.prompt_len - 1)):
            index = item.first_index + pos - item.start
            seq.prompt_logprobs.append(token_logprob(self.model, index, seq.tokens[pos + 1], n_top))

    def _send(self, outputs: list[tuple[RequestHandle, Output]]) -> None:
        if outputs and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        outputs = []
        for seq in seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "error"
                self._scheduler.release(seq)
                outputs.append((seq.handle, Output(seq.choice, "", [], "error", message)))
        self._send(outputs)

    def _fail_all(self, message: str) -> None:
        sched = self._scheduler
        self._fail(list(sched.running) + list(sched.waiting), message)
