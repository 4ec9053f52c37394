"""A thin, typed layer over llama.cpp's C API (the `llama_cpp` ctypes module).

Only what the engine needs: load a model into one context with many sequence slots, each its own KV stream,
tokenize, detokenize piece by piece, decode batches, and edit the KV cache per sequence.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import llama_cpp as C

_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        # Silence llama.cpp's own logging; we report progress ourselves.
        C.llama_log_set(_silent_log, ctypes.c_void_p())
        C.llama_backend_init()
        _backend_ready = True


@C.llama_log_callback
def _silent_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    return None


@dataclass(frozen=True)
class ContextConfig:
    n_ctx_seq: int = 4096  # context of each sequence slot: its own KV stream of this many cells
    n_seq_max: int = 16  # sequence slots
    n_batch: int = 128  # tokens per llama_decode call
    n_threads: int = max(1, os.cpu_count() or 1)
    flash_attn: bool = False  # faster prefill, but a prompt's logits then depend on how it was split (see below)


class LlamaError(RuntimeError):
    pass


class LlamaModel:
    """One GGUF model with one llama_context; with no ContextConfig, its vocabulary only (no weights, no context:
    tokenizing and templates)."""

    def __init__(
        self,
        path: str,
        config: ContextConfig | None,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        _init_backend()
        self.path = path
        self.config = config
        model_params = C.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model_params.use_extra_bufts = False
        model_params.vocab_only = config is None
        if on_progress is not None:
            # Keep a reference: ctypes callbacks are freed with their Python object.
            self._progress_cb = C.llama_progress_callback(lambda p, _: on_progress(p) or True)
            model_params.progress_callback = self._progress_cb
        self.model = C.llama_model_load_from_file(path.encode(), model_params)
        if not self.model:
            raise LlamaError(f"could not load model from {path!r} (is it a GGUF file?)")
        self.vocab = C.llama_model_get_vocab(self.model)
        self.n_vocab: int = C.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train: int = C.llama_model_n_ctx_train(self.model)
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._special_split = self._special_splitter()
        self.ctx = None
        if config is not None:
            self._create_context(config)

    def _create_context(self, config: ContextConfig) -> None:
        ctx_params = C.llama_context_default_params()
        ctx_params.n_ctx = config.n_ctx_seq * config.n_seq_max
        ctx_params.n_batch = config.n_batch
        ctx_params.n_ubatch = config.n_batch
        ctx_params.n_seq_max = config.n_seq_max
        ctx_params.n_threads = config.n_threads
        ctx_params.n_threads_batch = config.n_threads
        # One KV stream per slot, not one unified pool: in a unified cache every token attends over the cells of
        # all sequences (masked), which at 16 sequences costs more than the weights (measured: 136 vs 185 tok/s
        # decoding 16 sequences). A prefix is shared by copying its stream (llama_memory_seq_cp), ~5 ms per
        # 1024 cells, instead of referencing the cells.
        ctx_params.kv_unified = False
        ctx_params.no_perf = True
        # Flash attention off by default: with it, a prompt's logits depend on how it was split into batches
        # (measured: 0.8 apart for one prompt in one batch vs two), so prefix-cache hits change outputs. Without
        # it, prefill is split-invariant and a cached prefix gives bit-identical results.
        on = C.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx_params.flash_attn_type = on if config.flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = C.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            C.llama_model_free(self.model)
            raise LlamaError("could not create a llama.cpp context (too little memory for --ctx?)")
        self.n_ctx_seq: int = C.llama_n_ctx_seq(self.ctx)
        self.memory = C.llama_get_memory(self.ctx)

    # --- metadata -------------------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(65536)
        n = C.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            C.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        raw = C.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8") if raw else None

    def token_text(self, token: int) -> str:
        """The token's text with special tokens rendered (e.g. '<|im_end|>'), for templates."""
        return self._piece(token, special=True).decode("utf-8", errors="replace")

    @property
    def bos(self) -> int:
        return C.llama_vocab_bos(self.vocab)

    @property
    def eos(self) -> int:
        return C.llama_vocab_eos(self.vocab)

    @property
    def adds_bos(self) -> bool:
        return bool(C.llama_vocab_get_add_bos(self.vocab))

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))

    # --- tokens ---------------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        """With parse_special, texts of special tokens become those tokens."""
        if parse_special and self._special_split is not None:
            return self._tokenize_split(text, add_special, *self._special_split)
        return self._tokenize(text, add_special, parse_special)

    def _tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def _special_splitter(self) -> tuple[re.Pattern[str], dict[str, int]] | None:
        """What splitting a text at special tokens takes: a pattern of their texts (longest first) and their
        ids. None where llama.cpp's own parsing does more than split (whitespace stripped around some tokens,
        SentencePiece's space prefix at the start of each piece): there its parsing stays."""
        if C.llama_vocab_type(self.vocab) != C.LLAMA_VOCAB_TYPE_BPE:
            return None
        parsed = C.LLAMA_TOKEN_ATTR_CONTROL | C.LLAMA_TOKEN_ATTR_USER_DEFINED | C.LLAMA_TOKEN_ATTR_UNKNOWN
        ids: dict[str, int] = {}
        for token in range(self.n_vocab):
            attr = C.llama_vocab_get_attr(self.vocab, token)
            if attr & parsed and (text := self.token_text(token)):
                if attr & (C.LLAMA_TOKEN_ATTR_LSTRIP | C.LLAMA_TOKEN_ATTR_RSTRIP):
                    return None
                ids.setdefault(text, token)
        if not ids:
            return None
        return re.compile("|".join(map(re.escape, sorted(ids, key=len, reverse=True)))), ids

    def _tokenize_split(self, text: str, add_special: bool, pattern: re.Pattern[str], ids: dict[str, int]) -> list[int]:
        """As llama.cpp parses special tokens (split the text at them, tokenize each piece between), in time
        linear in their count: llama.cpp's own grows with its square (35,000 of them took a minute)."""
        tokens = [self.bos] if add_special and self.adds_bos else []
        pieces: dict[str, list[int]] = {}  # a piece met again (a run of turns) is tokenized once

        def add(piece: str) -> None:
            if piece not in pieces:
                pieces[piece] = self._tokenize(piece, False, False)
            tokens.extend(pieces[piece])

        start = 0
        for match in pattern.finditer(text):
            if match.start() > start:
                add(text[start : match.start()])
            tokens.append(ids[match.group()])
            start = match.end()
        if start < len(text):
            add(text[start:])
        if add_special and C.llama_vocab_get_add_eos(self.vocab):
            tokens.append(self.eos)
        return tokens

    def piece(self, token: int, special: bool = False) -> bytes:
        """The raw bytes a generated token contributes to the text; control tokens render as nothing unless
        `special` (then as their text, e.g. b'<|python_tag|>')."""
        cached = self._pieces.get((token, special))
        if cached is None:
            cached = self._pieces[(token, special)] = self._piece(token, special)
        return cached

    def _piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)  # per call: the engine thread and the event loop both come here
        n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        if not tokens:
            return ""
        arr = (C.llama_token * len(tokens))(*tokens)
        cap = len(tokens) * 16 + 16
        buf = ctypes.create_string_buffer(cap)
        n = C.llama_detokenize(self.vocab, arr, len(tokens), buf, cap, False, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_detokenize(self.vocab, arr, len(tokens), buf, -n, False, special)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def max_bytes_per_token(self) -> int:
        """The most prompt bytes one token can stand for: the vocabulary's longest piece (special tokens'
        text included: a prompt may spell them). For tokenizers that normalize text (UGM's NFKC, WordPiece's
        lower-casing and accent stripping can shorten it) four times that: NFKC shrinks a character at most
        threefold (full-width forms), except characters it drops, which no one sends by the megabyte."""
        longest = max(len(self._piece(t, True)) for t in range(self.n_vocab))
        exact = C.llama_vocab_type(self.vocab) in (C.LLAMA_VOCAB_TYPE_BPE, C.LLAMA_VOCAB_TYPE_SPM)
        return max(longest, 1) * (1 if exact else 4)

    def special_texts(self) -> list[str]:
        """The texts that tokenizing with parse_special turns into control or user-defined tokens."""
        wanted = C.LLAMA_TOKEN_ATTR_CONTROL | C.LLAMA_TOKEN_ATTR_USER_DEFINED
        texts = (self.token_text(t) for t in range(self.n_vocab) if C.llama_vocab_get_attr(self.vocab, t) & wanted)
        return [t for t in texts if t]

    def is_valid_token(self, token: int) -> bool:
        return 0 <= token < self.n_vocab

    # --- KV cache -------------------------------------------------------------------------------------------
    def kv_remove(self, seq_id: int, start: int = -1, end: int = -1) -> None:
        """Forget seq_id's cells at positions [start, end) (-1: open end)."""
        C.llama_memory_seq_rm(self.memory, seq_id, start, end)

    def kv_clear(self) -> None:
        """Forget every cell of every sequence, as at start (the buffers keep their stale values, which the
        attention mask hides: no cost of clearing them)."""
        C.llama_memory_clear(self.memory, False)

    def kv_copy(self, src: int, dst: int, end: int) -> None:
        """Give dst the KV of src's positions [0, end), without computing them. Slots live in separate streams,
        which llama.cpp copies whole (at the next decode); the copy is then cut back to `end`."""
        C.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        C.llama_memory_seq_rm(self.memory, dst, end, -1)

    # --- compute --------------------------------------------------------------------------------------------
    def decode(self, batch: Batch) -> int:
        return C.llama_decode(self.ctx, batch.raw)

    def logits(self, index: int) -> ctypes.Array[ctypes.c_float]:
        """Logits of the batch's index-th token that asked for them (valid until the next decode)."""
        ptr = C.llama_get_logits_ith(self.ctx, index)
        return (ctypes.c_float * self.n_vocab).from_address(ctypes.addressof(ptr.contents))

    def close(self) -> None:
        if self.ctx:
            C.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            C.llama_model_free(self.model)
            self.model = None


class Batch:
    """A reusable llama_batch of token inputs, each with one sequence id."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = C.llama_batch_init(capacity, 0, 1)
        self._token = self.raw.token
        self._pos = self.raw.pos
        self._n_seq_id = self.raw.n_seq_id
        self._seq_id = self.raw.seq_id
        self._logits = self.raw.logits
        for i in range(capacity):
            self._n_seq_id[i] = 1

    @property
    def size(self) -> int:
        return self.raw.n_tokens

    def clear(self) -> None:
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, want_logits: bool) -> int:
        """Append one token; returns its index in the batch."""
        i = self.raw.n_tokens
        self._token[i] = token
        self._pos[i] = pos
        self._seq_id[i][0] = seq_id
        self._logits[i] = want_logits
        self.raw.n_tokens = i + 1
        return i

    def free(self) -> None:
        C.llama_batch_free(self.raw)
