"""Which sequences run, in which slot, reusing which cached prefix, and what goes into the next batch.

Each slot is a llama.cpp sequence with its own KV stream of max_model_len cells, so a running sequence never
runs out of cells and nothing is preempted. Admission is first come, first served among the sequences of
tenants (accounts) with equally many running: the next free slot goes to the waiting sequence whose tenant runs
the fewest, the earliest of those, so one account's burst cannot keep every other account's requests queued
behind it. Two more rules:
- Lowest free slot first: llama.cpp splits a batch into one compute pass per run of consecutive sequence ids,
  so keeping running slots contiguous keeps each step one pass (measured: one gap costs 12% of throughput).
- One prefill per prefix: a sequence whose prompt shares a long prefix with a prompt still being prefilled waits
  until that prefill has computed it, then copies its KV (llama_memory_seq_cp) instead of recomputing it. This
  is what makes n > 1, and a burst of requests with one system prompt, prefill their prompt once.
- Background sequences (batch lines) come last: admitted after every waiting live one, and in a step only when no
  live sequence has run or waited for LIVE_GRACE. On a CPU a step costs about as much per sequence it carries, so
  a batch sharing steps would slow live streams in proportion (measured: 8 batch lines took a live client from
  101 to 13 tokens/s); held back, they keep their slots and KV and go on where they stopped (nothing recomputed).

Images: a prompt chunk stops at the sequence's next image, which the engine decodes on its own (a batch holds
tokens or embeddings, never both); the sequence takes no part in batches until it has. A reused prefix never
ends inside an image.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter, deque
from dataclasses import dataclass

from llamaserve.engine.llama import Batch, LlamaModel
from llamaserve.engine.sequence import Sequence, Slot

# Background sequences wait this long after the last live one ran or waited: a client sending its requests back to
# back finds the engine free, not in the middle of a batch's step.
LIVE_GRACE = 0.05
# Wait for an in-flight prefill only when it would save at least this many tokens of compute.
MIN_SHARED_PREFILL = 16
# A reused prefix stops this many tokens short of the prompt's end, so the last prompt tokens are computed as a
# batch of at least two. A single-token batch takes llama.cpp's matrix-vector kernels, whose rounding differs:
# a repeated seeded request then sampled differently from its first run (measured).
RECOMPUTE = 2


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]; slices compare in C
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Scheduled:
    seq: Sequence
    start: int  # position of the first token fed this step
    count: int  # tokens fed this step
    logits_index: int  # batch index whose logits sample the next token, or -1 (prompt chunk mid-way)
    first_index: int  # batch index of the first token fed (all of them have logits if prompt logprobs are wanted)


class Scheduler:
    def __init__(self, model: LlamaModel, n_slots: int) -> None:
        self.model = model
        self.slots = [Slot(i) for i in range(n_slots)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.live_at = -math.inf  # monotonic time a live (not background) sequence last ran or waited

    # --- admission ------------------------------------------------------------------------------------------
    def admit(self) -> list[Sequence]:
        """Start waiting sequences in free slots, fairly across tenants; returns those started."""
        started: list[Sequence] = []
        free = [s for s in self.slots if s.seq is None]
        if not free or not self.waiting:
            return started
        running = Counter(_tenant(seq) for seq in self.running)
        queues: dict[tuple[str, bool], deque[tuple[int, Sequence]]] = {}  # each tenant's waiting, in arrival order
        for position, seq in enumerate(self.waiting):
            queues.setdefault(_tenant(seq), deque()).append((position, seq))
        # Tenants by (background, sequences running, arrival of their first waiting sequence): the next to start is
        # first. A tenant's background sequences count as a tenant of their own.
        turns = [(tenant[1], running[tenant], queue[0][0], tenant) for tenant, queue in queues.items()]
        heapq.heapify(turns)
        while turns and free:
            background, count, _, tenant = heapq.heappop(turns)
            queue = queues[tenant]
            _, seq = queue.popleft()
            target = free[0]
            source, shared = self._best_prefix(seq, target)
            if not self._prefix_in_flight(seq, shared):  # else it keeps its place; others may start meanwhile
                self.waiting.remove(seq)
                self._attach(seq, target, source, shared)
                started.append(seq)
                free.pop(0)
                count += 1
            if queue:
                heapq.heappush(turns, (background, count, queue[0][0], tenant))
        return started

    # --- background sequences -------------------------------------------------------------------------------
    def _background_held(self) -> bool:
        """Whether background sequences sit out the next step: a live sequence runs or waits, or did within
        LIVE_GRACE."""
        now = time.monotonic()
        if any(not seq.request.background for seq in (*self.running, *self.waiting)):
            self.live_at = now
        return now - self.live_at < LIVE_GRACE

    def idle_timeout(self, longest: float) -> float:
        """How long an idle engine may wait for commands: until held background sequences may run again."""
        if not any(seq.request.background for seq in self.running):
            return longest
        return min(longest, max(0.001, self.live_at + LIVE_GRACE - time.monotonic()))

    def _best_prefix(self, seq: Sequence, target: Slot) -> tuple[Slot | None, int]:
        """The slot whose KV holds the longest prefix of this prompt (all but its last RECOMPUTE tokens),
        preferring the target slot on ties: reused in place, the prefix needs no copy."""
        if seq.needs_prompt_logprobs:
            return None, 0  # every prompt token's logits are wanted: compute them all
        want = seq.tokens[: seq.prompt_len - RECOMPUTE]
        best: Slot | None = None
        best_key = (0, False)
        for slot in self.slots:
            key = (common_prefix_len(want, slot.tokens), slot is target)
            if key[0] > 0 and key > best_key:
                best, best_key = slot, key
        return best, seq.image_boundary(best_key[0])

    def _prefix_in_flight(self, seq: Sequence, shared: int) -> bool:
        if seq.needs_prompt_logprobs:
            return False
        want = seq.tokens[: seq.prompt_len - RECOMPUTE]
        for other in self.running:
            if other.prefilling:
                if common_prefix_len(want, other.prompt) - shared >= MIN_SHARED_PREFILL:
                    return True
        return False

    def _clear(self, slot: Slot) -> None:
        self.model.kv_remove(slot.id)
        slot.tokens = []

    def _attach(self, seq: Sequence, slot: Slot, source: Slot | None, shared: int) -> None:
        if source is slot:
            self.model.kv_remove(slot.id, shared, -1)
            del slot.tokens[shared:]
        elif source is not None and shared > 0:
            self.model.kv_copy(source.id, slot.id, shared)
            slot.tokens = source.tokens[:shared]
        else:
            self._clear(slot)
        slot.seq = seq
        seq.slot = slot
        seq.cached_tokens = seq.tokens_before(shared)
        self.running.append(seq)

    def reset_cache(self) -> bool:
        """Forget every cached prefix, leaving the KV cache as a fresh start leaves it; only when no sequence runs
        or waits (False otherwise): a running sequence's cells cannot go."""
        if self.running or self.waiting:
            return False
        self.model.kv_clear()
        for slot in self.slots:
            slot.tokens = []
        return True

    def release(self, seq: Sequence) -> None:
        """Take a running or waiting sequence out; its slot keeps its KV as prefix cache."""
        if seq.sampler is not None:
            free = seq.sampler.free
            if seq.masking is not None:  # the grammar thread may hold it: freed when that draw is done
                seq.masking.cancel()
                seq.masking.add_done_callback(lambda _: free())
            else:
                free()
            seq.sampler, seq.masking = None, None
        for encoding in seq.encodings.values():
            encoding.cancel()  # if not started yet
        seq.encodings.clear()
        if seq.slot is None:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return
        self.running.remove(seq)
        slot = seq.slot
        slot.seq = None
        # Keep only the prompt's KV as cache. Generated tokens were computed one per step, by llama.cpp's
        # matrix-vector path; a later prompt that contains them (the next chat turn) computes them as a batch,
        # whose kernels round differently. Recomputing them keeps outputs identical with and without the cache.
        if len(slot.tokens) > seq.prompt_len:
            self.model.kv_remove(slot.id, seq.prompt_len, -1)
            del slot.tokens[seq.prompt_len :]

    # --- batching -------------------------------------------------------------------------------------------
    def fill(self, batch: Batch, budget: int) -> list[Scheduled]:
        """One token for every generating sequence, then prompt chunks (oldest first, each up to its next image)
        while the budget lasts; laid out in slot order, so that consecutive slots share one compute pass."""
        counts: dict[int, int] = {}
        held = self._background_held()
        runnable = [seq for seq in self.running if not (held and seq.request.background)]
        for seq in sorted(runnable, key=lambda s: s.prefilling):  # stable: admission order within each
            if budget <= 0:
                break
            counts[id(seq)] = n = min(seq.pending, budget)  # 0: an image is due
            budget -= n
        batch.clear()
        plan: list[Scheduled] = []
        for seq in sorted(self.running, key=lambda s: s.slot.id if s.slot else -1):
            count = counts.get(id(seq), 0)
            if count == 0:
                continue
            slot = seq.slot
            assert slot is not None
            start = len(slot.tokens)
            last = len(seq.tokens) - 1
            every = seq.needs_prompt_logprobs and start < seq.prompt_len
            first = batch.size
            index = -1
            for pos in range(start, start + count):
                i = batch.add(seq.tokens[pos], pos, slot.id, every or pos == last)
                if pos == last:
                    index = i
            plan.append(Scheduled(seq, start, count, index, first))
        return plan


def _tenant(seq: Sequence) -> tuple[str, bool]:
    """Whose sequence, for a fair share of the slots: an account's background sequences apart from its live ones."""
    return seq.request.tenant, seq.request.background
