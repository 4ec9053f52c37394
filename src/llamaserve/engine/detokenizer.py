"""Incremental detokenization: bytes from token pieces become text that is safe to send.

Two things are held back until they are settled: the bytes of a UTF-8 character split across tokens, and any
tail of the text that could still grow into a stop string.
"""

from __future__ import annotations

import codecs


class Detokenizer:
    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""  # decoded text not yet released (may be the start of a stop string)
        self.text = ""  # everything released so far
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Add a token's bytes; returns newly released text. Sets `stopped` when a stop string appears."""
        self._held += self._utf8.decode(piece)
        if not self._stop:
            return self._release(len(self._held))
        # Released text never ends in a possible stop prefix, so a stop string lies wholly in the held text.
        cut = self._find_stop()
        if cut is not None:
            self.stopped = True
            delta = self._held[:cut]
            self._held = ""
            self.text += delta
            return delta
        return self._release(len(self._held) - self._partial_stop_len())

    def flush(self) -> str:
        """At the end of generation, release what was held (a stop prefix that never completed is text)."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(b"", final=True)
        return self._release(len(self._held))

    def _release(self, n: int) -> str:
        delta, self._held = self._held[:n], self._held[n:]
        self.text += delta
        return delta

    def _find_stop(self) -> int | None:
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the held text that is a proper prefix of some stop string."""
        held = self._held
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(held)), best, -1):
                if held.endswith(s[:k]):
                    best = k
                    break
        return best
