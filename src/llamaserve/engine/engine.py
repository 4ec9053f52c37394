"""The engine: a step loop on its own thread, and the asyncio side that request handlers talk to.

Each step: take new requests and cancellations, admit waiting sequences into free slots, build one batch (a
token for each generating sequence plus prompt chunks), run one llama_decode, sample every sequence whose
logits came out, and hand the new text to the requests' queues on the event loop. ctypes releases the GIL in
llama_decode, so the HTTP side keeps serving while the model computes.

Images (with a projector): when a sequence starts, its images not already in its cached prefix go to an encoder
thread (the vision encoder is the costly part, and runs beside the steps: ctypes releases the GIL there too).
When its prefill reaches an image whose embeddings are ready, the engine thread decodes them into the sequence's
own KV with a llama_decode of their own, between two steps; the other sequences' state is their KV, untouched,
and the last step's logits have been sampled already. Until then the sequence sits out the batches.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llamaserve.engine.llama import Batch, ContextConfig, LlamaModel
from llamaserve.engine.logprobs import TokenLogprob, logprob_of, token_logprob
from llamaserve.engine.metrics import EngineMetrics
from llamaserve.engine.mtmd import Chunk, MtmdError, Projector
from llamaserve.engine.prompt import ImageSpan, Prompt
from llamaserve.engine.sampling import GrammarError, Sampler, SamplingParams
from llamaserve.engine.scheduler import Scheduled, Scheduler
from llamaserve.engine.sequence import Output, Request, Sequence

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
    prompt_tokens_computed: int = 0  # image embeddings included
    prompt_tokens_cached: int = 0
    images_encoded: int = 0
    generated_tokens: int = 0
    max_batch_sequences: int = 0  # the most sequences one llama_decode ever carried
    max_batch_generating: int = 0  # the most sequences that got a new token from one llama_decode
    running: int = 0
    waiting: int = 0


@dataclass
class RequestHandle:
    """The asyncio side of one request: n choices streaming Outputs into one queue. Only the event loop touches
    it; the engine thread knows the request by `key`."""

    key: int  # the engine's id of the request
    id: str  # the request's own id (X-Request-Id), for logs
    prompt_tokens: int  # text tokens plus image tokens: what usage reports
    n: int
    engine: Engine
    queue: asyncio.Queue[Output] = field(default_factory=asyncio.Queue)
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache served (the first choice's)
    finished_choices: int = 0
    failed: bool = False  # a choice ended with an engine error
    closed: bool = False
    on_close: Callable[[], None] | None = None  # called once, when the request gives its place back
    first_token_at: float | None = None  # perf_counter when its first token was sampled

    @property
    def done(self) -> bool:
        return self.finished_choices >= self.n

    async def outputs(self) -> AsyncIterator[Output]:
        """Outputs of every choice, in the order produced, until all have finished. Leaving early (a client
        that went away) cancels the rest."""
        try:
            while not self.done:
                out = await self.queue.get()
                self._count(out)
                yield out
        finally:
            self.close()

    def _count(self, out: Output) -> None:
        self.completion_tokens += len(out.token_ids)
        self.failed = self.failed or out.error is not None
        if out.choice == 0:
            self.cached_tokens = out.cached_tokens
        if out.token_ids and self.first_token_at is None:
            self.first_token_at = out.sampled_at
        if out.finish_reason is not None:
            self.finished_choices += 1

    def close(self) -> None:
        """Give the request's place back; cancels choices still generating. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.engine.forget(self, abort=not self.done)
        if self.on_close is not None:
            self.on_close()


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        max_waiting: int = 1024,
        projector: Projector | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.model = model
        self.projector = projector
        self.config: ContextConfig = model.config
        self.max_model_len = min(model.n_ctx_seq, model.n_ctx_train or model.n_ctx_seq)
        self.max_waiting = max_waiting
        self.stats = EngineStats()
        self.metrics = metrics or EngineMetrics()
        self.outstanding = 0  # sequences submitted and not yet consumed (touched on the event loop only)
        self._scheduler = Scheduler(model, self.config.n_seq_max)
        self._batch = Batch(self.config.n_batch)
        # Commands to the engine thread: ("add", Request), ("abort", request id), ("reset", Future), ("wake", None).
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._handles: dict[int, RequestHandle] = {}  # the event loop's: requests in flight, by id
        self._requests: dict[int, Request] = {}  # the engine thread's: requests not finished, by id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llamaserve-engine", daemon=True)
        # One encoder thread: the projector encodes one image at a time anyway.
        self._encoder = ThreadPoolExecutor(1, "llamaserve-encode") if projector is not None else None
        # One thread for draws the grammar must mask the whole vocabulary for: such a sequence sits out the
        # batches until its token is drawn, and the others go on (a 1000-value enum costs ~100 ms a token).
        self._masker = ThreadPoolExecutor(1, "llamaserve-grammar")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def n_slots(self) -> int:
        return self.config.n_seq_max

    def kv_cells(self) -> tuple[int, int, int]:
        """KV cache cells: holding tokens (running sequences, and prompts kept as prefix cache), of running
        sequences, in all. Read from any thread (a metrics scrape): lengths of lists, a snapshot."""
        slots = self._scheduler.slots
        used = sum(len(s.tokens) for s in slots)
        active = sum(len(s.tokens) for s in slots if s.seq is not None)
        return used, active, self.max_model_len * len(slots)

    # --- asyncio side ---------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._encoder is not None:
            self._encoder.shutdown(wait=True, cancel_futures=True)
        self._masker.shutdown(wait=True, cancel_futures=True)

    def submit(
        self,
        prompt: Seq[int] | Seq[Chunk],
        params: SamplingParams,
        n: int = 1,
        request_id: str = "",
        tenant: str = "",
        background: bool = False,
    ) -> RequestHandle:
        """Queue a request of n choices; iterate `handle.outputs()` for its text. Call on the event loop. The
        prompt is token ids, or chunks (token lists and images from the projector, in order). `tenant`: whose
        request, for a fair share of the slots. `background`: a batch line, run only while no live request is."""
        p = Prompt.of(prompt)
        if not p.tokens:
            raise InvalidPrompt("the prompt is empty: give at least one token", "empty_prompt")
        if p.images:
            self._check_images(p, params)
        if p.n_tokens >= self.max_model_len:
            raise InvalidPrompt(
                f"the prompt is {p.n_tokens} tokens; this model's context is {self.max_model_len} tokens "
                "and leaves no room to generate",
                "context_length_exceeded",
            )
        if not self.alive:
            raise EngineOverloaded("the engine has stopped; see the server log")
        if self.outstanding + n > self.n_slots + self.max_waiting:
            raise EngineOverloaded(
                f"the engine is at capacity ({self.n_slots} running, {self.max_waiting} queued); retry shortly"
            )
        key = next(self._ids)
        handle = RequestHandle(key, request_id or f"req-{key}", p.n_tokens, n, self)
        request = Request(key, tenant, time.perf_counter(), background=background)
        max_new = min(params.max_tokens, self.max_model_len - p.n_tokens)
        request.sequences = [Sequence(request, i, p, params, max_new) for i in range(n)]
        self.outstanding += n
        self._handles[key] = handle
        self._inbox.put(("add", request))
        return handle

    async def reset_cache(self) -> bool:
        """Forget the prefix cache, so the next requests find the KV cache as a fresh start leaves it (outputs
        depend on its layout: docs/determinism.md). False while any request runs or waits."""
        if not self.alive:
            raise EngineOverloaded("the engine has stopped; see the server log")
        done: Future[bool] = Future()
        self._inbox.put(("reset", done))
        return await asyncio.wrap_future(done)

    def _check_images(self, prompt: Prompt, params: SamplingParams) -> None:
        if self.projector is None:
            raise InvalidPrompt("this model takes no images (no projector is loaded)", "image_input_not_supported")
        if prompt.images[-1].end == len(prompt.tokens):
            # The first token is sampled from the last prompt token's logits: keep that a text token.
            raise InvalidPrompt("a prompt must end with text, not with an image", "invalid_prompt")
        if params.prompt_logprobs is not None:
            raise InvalidPrompt("prompt logprobs (echo with logprobs) are not available with images", "invalid_prompt")
        largest = max(image.chunk.n_tokens for image in prompt.images)
        if self.projector.uses_non_causal and largest > self.config.n_batch:
            # Such an image attends to itself whole: it must fit one batch (llama.cpp would abort the process).
            raise InvalidPrompt(
                f"an image of {largest} tokens does not fit this server's batch of {self.config.n_batch} tokens, "
                "which this model needs (the server's --batch must be raised)",
                "image_too_large",
            )

    def forget(self, handle: RequestHandle, abort: bool) -> None:
        """A handle closed: its place given back, its choices still generating cancelled if `abort`."""
        del self._handles[handle.key]
        self.outstanding -= handle.n
        if abort:
            self._inbox.put(("abort", handle.key))

    def _deliver(self, outputs: list[tuple[int, Output]]) -> None:
        for key, out in outputs:
            handle = self._handles.get(key)
            if handle is not None:  # else closed: nobody reads it
                handle.queue.put_nowait(out)

    # --- engine thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        sched = self._scheduler
        idle = True
        try:
            while not self._stop.is_set():
                # Wait for work when the last pass did none: nothing runs, or every running sequence waits for an
                # image encoding (whose end puts a wake-up in the inbox). A pass that did work goes on at once, also
                # when it finished the last running sequence: the waiting ones start in the slots it freed.
                self._take_commands(block=idle, timeout=sched.idle_timeout(0.5))
                drawn = self._take_masked()
                started = sched.admit()
                if started:
                    self._observe_started(started)
                for seq in started:
                    if seq.images:
                        self._start_encoding(seq)
                decoded = self._decode_images() if self.projector is not None else False
                plan = sched.fill(self._batch, self.config.n_batch)
                if plan:
                    self._step(plan)
                idle = not (plan or decoded or drawn)
                self.stats.running, self.stats.waiting = len(sched.running), len(sched.waiting)
        except Exception:  # a bug here must not leave every client hanging
            log.exception("engine loop crashed")
            self._fail_all("internal engine error")

    def _observe_started(self, started: list[Sequence]) -> None:
        now = time.perf_counter()
        for seq in started:
            self.metrics.queue_wait.observe(now - seq.request.submitted)

    def _take_commands(self, block: bool, timeout: float) -> None:
        try:
            cmd, arg = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if cmd == "add":
                self._add(arg)
            elif cmd == "abort" and (request := self._requests.pop(arg, None)) is not None:
                for seq in request.sequences:
                    if seq.finish_reason is None:
                        seq.finish_reason = "abort"
                        self._scheduler.release(seq)
            elif cmd == "reset":
                arg.set_result(self._scheduler.reset_cache())
            try:
                cmd, arg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, request: Request) -> None:
        """Build the request's samplers and queue it. A request whose sampler cannot be built fails alone: an
        exception here would end the loop, and with it every other request."""
        self._requests[request.id] = request
        try:
            for seq in request.sequences:
                seq.sampler = Sampler(self.model, seq.params, seed_offset=seq.choice)
                seq.sampler.accept_prompt(seq.text_prompt)
        except GrammarError as e:
            self._fail(request.sequences, str(e))  # frees the samplers made so far
            return
        except Exception as e:
            log.exception("request %d: its sampler could not be built", request.id)
            self._fail(request.sequences, f"the sampler could not be built ({type(e).__name__})")
            return
        self._scheduler.waiting.extend(request.sequences)

    # --- images -----------------------------------------------------------------------------------------------
    def _start_encoding(self, seq: Sequence) -> None:
        """Encode the images beyond the sequence's reused prefix, in prompt order, on the encoder thread."""
        assert seq.slot is not None
        for image in seq.images:
            if image.start >= len(seq.slot.tokens):
                self._encode(seq, image)

    def _encode(self, seq: Sequence, image: ImageSpan) -> Future[np.ndarray]:
        assert self._encoder is not None
        future = self._encoder.submit(self._encode_one, image)
        future.add_done_callback(lambda _: self._inbox.put(("wake", None)))
        seq.encodings[image.start] = future
        return future

    def _encode_one(self, image: ImageSpan) -> np.ndarray:
        embeddings = image.chunk.encode()
        self.stats.images_encoded += 1
        return embeddings

    def _decode_images(self) -> bool:
        """Decode every image a prefill has reached and whose embeddings are ready into its sequence's KV.
        Returns whether any was."""
        decoded = False
        for seq in list(self._scheduler.running):
            image = seq.image_due()
            if image is None:
                continue
            future = seq.encodings.get(image.start) or self._encode(seq, image)
            if not future.done():
                continue
            del seq.encodings[image.start]
            decoded = self._decode_image(seq, image, future) or decoded
        return decoded

    def _decode_image(self, seq: Sequence, image: ImageSpan, future: Future[np.ndarray]) -> bool:
        slot = seq.slot
        assert slot is not None and self.projector is not None
        try:
            embeddings = future.result()
            self.projector.decode_image(self.model.ctx, image.chunk, embeddings, image.start, slot.id)
        except (MtmdError, ValueError) as e:
            self.model.kv_remove(slot.id, len(slot.tokens), -1)  # what part of the image made it in
            self._fail([seq], f"the image could not be processed: {e}")
            return False
        slot.tokens.extend(seq.tokens[image.start : image.end])
        self.stats.prompt_tokens_computed += image.chunk.n_tokens
        return True

    def _step(self, plan: list[Scheduled]) -> None:
        rc = self.model.decode(self._batch)
        if rc != 0:
            self._fail([s.seq for s in plan], f"llama_decode failed with code {rc}")
            return
        now = time.perf_counter()
        stats, metrics = self.stats, self.metrics
        stats.steps += 1
        stats.max_batch_sequences = max(stats.max_batch_sequences, len(plan))
        metrics.batch_sequences.observe(len(plan))
        metrics.batch_tokens.observe(self._batch.size)
        outputs: list[tuple[int, Output]] = []
        sampled = 0
        for item in plan:
            try:
                sampled += self._advance(item, outputs, now)
            except Exception as e:  # one sequence's failure (its sampler, its text) ends that sequence only
                log.exception("request %d: a step failed", item.seq.request.id)
                self._fail([item.seq], f"generation failed ({type(e).__name__})")
        stats.generated_tokens += sampled
        stats.max_batch_generating = max(stats.max_batch_generating, sampled)
        self._send(outputs)

    def _advance(self, item: Scheduled, outputs: list[tuple[int, Output]], now: float) -> int:
        """Account for one sequence's part of the step and sample its next token if its logits came out;
        returns how many tokens it sampled (0 or 1)."""
        seq, stats = item.seq, self.stats
        slot = seq.slot
        assert slot is not None and seq.sampler is not None
        if item.start < seq.prompt_len:
            stats.prompt_tokens_computed += min(item.count, seq.prompt_len - item.start)
            if seq.prompt_logprobs is not None:
                self._prompt_logprobs(seq, item)
        slot.tokens.extend(seq.tokens[item.start : item.start + item.count])
        if item.logits_index < 0:
            return 0
        if seq.n_generated == 0:
            stats.prompt_tokens_cached += seq.cached_tokens
        if seq.max_new == 0:
            seq.end_unsampled()
            self._emit(seq, outputs)
            return 0
        token = seq.sampler.sample(self.model, item.logits_index)
        if token is None:  # the grammar must mask the vocabulary: on the grammar thread, while others go on
            seq.masking = self._masker.submit(seq.sampler.sample_masked)
            seq.masking.add_done_callback(lambda _: self._inbox.put(("wake", None)))
            return 0
        n_top = seq.params.logprobs
        logprob = None if n_top is None else token_logprob(self.model, item.logits_index, token, n_top)
        self._take(seq, token, logprob, outputs, now)
        return 1

    def _take(
        self,
        seq: Sequence,
        token: int,
        logprob: TokenLogprob | None,
        outputs: list[tuple[int, Output]],
        now: float,
    ) -> None:
        """A sampled token: into the sequence's text, its output, and its end if it ends there."""
        seq.append(token, self.model, logprob)
        self._observe_token(seq, now)
        self._emit(seq, outputs)

    def _emit(self, seq: Sequence, outputs: list[tuple[int, Output]]) -> None:
        """The sequence's new output, if any; its slot freed if it has ended."""
        out = seq.take_output()
        if out is not None:
            outputs.append((seq.request.id, out))
        if seq.finish_reason is not None:
            self._scheduler.release(seq)
            self.stats.sequences_finished += 1
            self._forget_if_finished(seq.request)

    def _forget_if_finished(self, request: Request) -> None:
        if request.finished:
            self._requests.pop(request.id, None)

    def _take_masked(self) -> bool:
        """The tokens the grammar thread has drawn, taken as if sampled in a step; returns whether any was."""
        outputs: list[tuple[int, Output]] = []
        now = time.perf_counter()
        drawn = 0
        for seq in list(self._scheduler.running):
            if seq.masking is None or not seq.masking.done():
                continue
            future, seq.masking = seq.masking, None
            try:
                token = future.result()
                n_top = seq.params.logprobs
                assert seq.sampler is not None and seq.sampler.logits is not None
                logprob = None if n_top is None else logprob_of(seq.sampler.logits, token, n_top)
                self._take(seq, token, logprob, outputs, now)
                drawn += 1
            except Exception as e:  # one sequence's failure ends that sequence only
                log.exception("request %d: a grammar draw failed", seq.request.id)
                self._fail([seq], f"generation failed ({type(e).__name__})")
        self.stats.generated_tokens += drawn
        self._send(outputs)
        return drawn > 0

    def _observe_token(self, seq: Sequence, now: float) -> None:
        """Time to first token (from submission) or since the sequence's previous token."""
        if seq.n_generated == 1:
            self.metrics.ttft.observe(now - seq.request.submitted)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now

    def _prompt_logprobs(self, seq: Sequence, item: Scheduled) -> None:
        """Logprobs of the prompt tokens this chunk predicts: the logits at position p score token p + 1."""
        assert seq.prompt_logprobs is not None
        n_top = seq.params.prompt_logprobs or 0
        if item.start == 0:
            seq.prompt_logprobs.append(TokenLogprob(seq.tokens[0], None))
        for pos in range(item.start, min(item.start + item.count, seq.prompt_len - 1)):
            index = item.first_index + pos - item.start
            seq.prompt_logprobs.append(token_logprob(self.model, index, seq.tokens[pos + 1], n_top))

    def _send(self, outputs: list[tuple[int, Output]]) -> None:
        if outputs and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        outputs = []
        for seq in seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "error"
                self._scheduler.release(seq)
                self._forget_if_finished(seq.request)
                outputs.append((seq.request.id, Output(seq.choice, "", [], "error", message)))
        self._send(outputs)

    def _fail_all(self, message: str) -> None:
        sched = self._scheduler
        self._fail(list(sched.running) + list(sched.waiting), message)
