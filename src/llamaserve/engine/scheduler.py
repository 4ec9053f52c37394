"""Which sequences run, in which slot, reusing which cached prefix, and what goes into the next batch.

Admission is first come, first served, with two rules:
- KV budget: the worst case (prompt + max new tokens) of every running sequence, plus the cells idle slots keep
  as prefix cache, must fit in the context. Idle caches are evicted, least recently used first, to make room;
  so a running sequence never runs out of cells and nothing has to be preempted.
- One prefill per prefix: a sequence whose prompt shares a long prefix with a prompt still being prefilled waits
  until that prefill has computed it, then shares its cells (llama_memory_seq_cp) instead of recomputing them.
  This is what makes n > 1, and a burst of requests with one system prompt, prefill their prompt once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llamaserve.engine.llama import Batch, LlamaModel
from llamaserve.engine.sequence import Sequence, Slot

# Wait for an in-flight prefill only when it would save at least this many tokens of compute.
MIN_SHARED_PREFILL = 16


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


class Scheduler:
    def __init__(self, model: LlamaModel, n_slots: int) -> None:
        self.model = model
        self.n_ctx = model.n_ctx
        self.slots = [Slot(i) for i in range(n_slots)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved = 0  # Σ reserve of running sequences
        self.clock = 0

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # --- admission ------------------------------------------------------------------------------------------
    def admit(self) -> None:
        self.clock += 1
        for seq in list(self.waiting):
            free = [s for s in self.slots if s.seq is None]
            if not free:
                return
            source, shared = self._best_prefix(seq)
            if self._prefix_in_flight(seq, shared):
                continue  # keeps its place; others behind it may start meanwhile
            if not self._make_room(seq.reserve, keep=source):
                return
            slot = source if source is not None and source.seq is None else self._coldest(free)
            self.waiting.remove(seq)
            self._attach(seq, slot, source, shared)

    def _best_prefix(self, seq: Sequence) -> tuple[Slot | None, int]:
        """The slot whose KV holds the longest prefix of this prompt (all but its last token, whose logits
        we need), preferring a free slot on ties so the cells are reused in place."""
        want = seq.tokens[: seq.prompt_len - 1]
        best: Slot | None = None
        best_key = (0, False)
        for slot in self.slots:
            key = (common_prefix_len(want, slot.tokens), slot.seq is None)
            if key[0] > 0 and key > best_key:
                best, best_key = slot, key
        best_len = best_key[0]
        return best, best_len

    def _prefix_in_flight(self, seq: Sequence, shared: int) -> bool:
        want = seq.tokens[: seq.prompt_len - 1]
        for other in self.running:
            if other.prefilling:
                if common_prefix_len(want, other.prompt) - shared >= MIN_SHARED_PREFILL:
                    return True
        return False

    def _make_room(self, need: int, keep: Slot | None) -> bool:
        idle = sorted((s for s in self.slots if s.seq is None and s.tokens), key=lambda s: s.last_used)
        used = self.reserved + sum(len(s.tokens) for s in idle if s is not keep)
        for slot in idle:
            if used + need <= self.n_ctx:
                break
            if slot is keep:
                continue
            used -= len(slot.tokens)
            self._evict(slot)
        return used + need <= self.n_ctx

    def _coldest(self, free: list[Slot]) -> Slot:
        return min(free, key=lambda s: (bool(s.tokens), s.last_used))

    def _evict(self, slot: Slot) -> None:
        self.model.kv_remove(slot.id)
        slot.tokens = []

    def _attach(self, seq: Sequence, slot: Slot, source: Slot | None, shared: int) -> None:
        if source is slot:
            self.model.kv_remove(slot.id, shared, -1)
            del slot.tokens[shared:]
        else:
            self._evict(slot)
            if source is not None and shared > 0:
                self.model.kv_copy(source.id, slot.id, shared)
                slot.tokens = source.tokens[:shared]
        slot.seq = seq
        seq.slot = slot
        seq.cached_tokens = shared
        self.running.append(seq)
        self.reserved += seq.reserve

    def release(self, seq: Sequence) -> None:
        """Take a running or waiting sequence out; its slot keeps its KV as prefix cache."""
        if seq.sampler is not None:
            seq.sampler.free()
            seq.sampler = None
        if seq.slot is None:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return
        self.running.remove(seq)
        self.reserved -= seq.reserve
        slot = seq.slot
        slot.seq = None
        slot.last_used = self.clock
        # Keep only the prompt's KV as cache. Generated tokens were computed one per step, by llama.cpp's
        # matrix-vector path; a later prompt that contains them (the next chat turn) computes them as a batch,
        # whose kernels round differently. Recomputing them keeps outputs identical with and without the cache.
        if len(slot.tokens) > seq.prompt_len:
            self.model.kv_remove(slot.id, seq.prompt_len, -1)
            del slot.tokens[seq.prompt_len :]

    def evict_idle(self) -> None:
        for slot in self.slots:
            if slot.seq is None and slot.tokens:
                self._evict(slot)

    # --- batching -------------------------------------------------------------------------------------------
    def fill(self, batch: Batch, budget: int) -> list[Scheduled]:
        """One decode token for every generating sequence, then prompt chunks while the budget lasts."""
        batch.clear()
        plan: list[Scheduled] = []
        generating = [s for s in self.running if not s.prefilling]
        prefilling = [s for s in self.running if s.prefilling]
        for seq in generating + prefilling:
            if budget <= 0:
                break
            slot = seq.slot
            assert slot is not None
            start = len(slot.tokens)
            count = min(len(seq.tokens) - start, budget)
            end = start + count
            last = len(seq.tokens) - 1
            index = -1
            for pos in range(start, end):
                i = batch.add(seq.tokens[pos], pos, slot.id, pos == last)
                if pos == last:
                    index = i
            plan.append(Scheduled(seq, start, count, index))
            budget -= count
        return plan
