"""A thin, typed layer over llama.cpp's multimodal library, mtmd (`llama_cpp.mtmd_cpp`), for image inputs.

A vision model is two GGUF files: the text model, loaded as usual (llama.py), and a projector ("mmproj") that turns
an image into embeddings the text model reads in place of tokens. This module loads the projector against the
loaded text model, splits a prompt with images into chunks (token lists and images, in order), encodes an image to
an (n_tokens, n_embd) float32 array, and decodes such arrays into a sequence's KV cache with llama_decode.

What llama.cpp requires, and this module enforces or exposes:
- The prompt marks each image with the projector's marker (`<__media__>`); mtmd adds the model's own image
  delimiters (e.g. Gemma 3's `<start_of_image>`) around it. `tokenize_parts` takes text and images in order
  instead, so user text that happens to contain the marker cannot shift the images.
- A batch holds tokens or embeddings, never both: an image is decoded in its own llama_decode.
- Some models (Gemma 3) need non-causal attention over an image: the whole image then goes in one micro-batch
  (llama.cpp aborts the process otherwise), so `decode_image` refuses images larger than the context's n_ubatch.
- M-RoPE models (Qwen2-VL and later) give each image token 4 positions (t, y, x, and a spare), laid out
  section-major in the batch, and an image advances the sequence's position by n_pos, not n_tokens.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
import weakref
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as C
import numpy as np
from llama_cpp import mtmd_cpp as M

from llamaserve.engine.llama import LlamaError

_GGML_LOG_LEVEL_ERROR = 4


class MtmdError(LlamaError):
    """mtmd could not do what was asked (load a projector, tokenize, encode, decode); the message says why."""


# mtmd logs its reasons (wrong n_embd, unknown projector type, ...) instead of returning them: keep the last few
# error lines to put in our exceptions, and drop the rest of its chatter.
_errors: deque[str] = deque(maxlen=8)
_errors_lock = threading.Lock()


@C.llama_log_callback
def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == _GGML_LOG_LEVEL_ERROR and text:
        _errors.append(text.decode("utf-8", errors="replace").strip())


M.mtmd_helper_log_set(_log, None)  # sets mtmd's and clip's loggers too


def _failure(what: str) -> MtmdError:
    reasons = "; ".join(_errors)
    _errors.clear()
    return MtmdError(f"{what}: {reasons}" if reasons else what)


def default_marker() -> str:
    return M.mtmd_default_marker().decode("utf-8")


@dataclass(frozen=True)
class RGBImage:
    """An image as packed 8-bit RGB rows (width * height * 3 bytes), e.g. Pillow's `im.convert("RGB").tobytes()`."""

    data: bytes
    width: int
    height: int
    id: str = field(init=False)  # content hash: equal pixels, equal id (prefix cache key)

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, not {self.width}x{self.height}")
        if len(self.data) != self.width * self.height * 3:
            # mtmd copies width * height * 3 bytes from the pointer, whatever the buffer's length.
            raise ValueError(
                f"{self.width}x{self.height} RGB needs {self.width * self.height * 3} bytes, not {len(self.data)}"
            )
        digest = hashlib.sha256(f"{self.width}x{self.height}:".encode())
        digest.update(self.data)
        object.__setattr__(self, "id", digest.hexdigest())


class ImageChunk:
    """One image's embedding tokens in a prompt (or one tile of an image, for models that tile large images).

    Owns its copy of mtmd's chunk (the preprocessed pixels), freed by `close()` or when collected."""

    def __init__(self, projector: Projector, ptr: int, image_id: str, tile: int) -> None:
        self._projector = projector
        self._ptr = ptr
        self._free = weakref.finalize(self, M.mtmd_input_chunk_free, ptr)
        self.n_tokens: int = M.mtmd_input_chunk_get_n_tokens(ptr)  # embedding rows
        self.n_pos: int = M.mtmd_input_chunk_get_n_pos(ptr)  # positions it advances the sequence by
        self.image_id = image_id
        self.id = image_id if tile == 0 else f"{image_id}:{tile}"  # stable key for the prefix cache

    def __repr__(self) -> str:
        return f"ImageChunk(n_tokens={self.n_tokens}, n_pos={self.n_pos}, id={self.id[:12]!r})"

    @property
    def ptr(self) -> int:
        if not self._free.alive:
            raise MtmdError("image chunk is closed")
        return self._ptr

    def encode(self) -> np.ndarray:
        """The image's embeddings, float32 of shape (n_tokens, n_embd). Runs the vision encoder: costly."""
        return self._projector.encode(self)

    def positions(self, pos0: int) -> np.ndarray:
        """Positions of the image's tokens when it starts at pos0: int32 of shape (n_pos_per_embd, n_tokens),
        one row per RoPE section (t, y, x, spare) for M-RoPE models, else one row pos0, pos0 + 1, ..."""
        if not self._projector.uses_mrope:
            return np.arange(pos0, pos0 + self.n_tokens, dtype=np.int32)[None, :]
        out = (M.mtmd_decoder_pos * self.n_tokens)()
        M.mtmd_helper_image_get_decoder_pos(M.mtmd_input_chunk_get_tokens_image(self.ptr), pos0, out)
        rows = np.ctypeslib.as_array(out)
        return np.stack([rows["t"], rows["y"], rows["x"], rows["z"]]).astype(np.int32)

    def close(self) -> None:
        self._free()


Chunk = list[int] | ImageChunk  # text tokens, or an image


class Projector:
    """A multimodal projector (mmproj GGUF) loaded for one text model. It tokenizes with that model's vocabulary:
    close it before the model. Tokenizing is thread-safe; encoding runs one image at a time (a lock)."""

    def __init__(
        self,
        mmproj_path: str | Path,
        model: int | ctypes.c_void_p,  # the text model's llama_model pointer (LlamaModel.model)
        n_threads: int,
        *,
        use_gpu: bool = False,
        warmup: bool = True,  # encode a dummy image at load: sizes the compute buffers, fails early if short
        image_max_tokens: int | None = None,  # cap for dynamic-resolution models (Qwen2.5-VL: up to thousands)
    ) -> None:
        path = Path(mmproj_path)
        if not path.is_file():
            raise MtmdError(f"no projector file at {str(path)!r}")
        params = M.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = warmup
        if image_max_tokens is not None:
            params.image_max_tokens = image_max_tokens
        with _errors_lock:
            _errors.clear()
            ctx = M.mtmd_init_from_file(str(path).encode(), model, params)
            if not ctx:
                raise _failure(f"could not load projector {str(path)!r}")
        self._ctx: int | None = ctx
        self._free = weakref.finalize(self, M.mtmd_free, ctx)
        self._lock = threading.Lock()  # mtmd keeps one output buffer per context: one encode at a time
        if not M.mtmd_support_vision(ctx):
            self.close()
            raise MtmdError(f"projector {str(path)!r} has no vision encoder (audio only?)")
        self.path = path
        self.n_embd: int = C.llama_model_n_embd_inp(model)
        self.marker: str = M.mtmd_get_marker(ctx).decode("utf-8")
        self.uses_non_causal: bool = bool(M.mtmd_decode_use_non_causal(ctx, None))
        self.uses_mrope: bool = bool(M.mtmd_decode_use_mrope(ctx))
        self.n_pos_per_embd = 4 if self.uses_mrope else 1

    def close(self) -> None:
        with self._lock:
            self._ctx = None
            self._free()

    def _context(self) -> int:
        if self._ctx is None:
            raise MtmdError("projector is closed")
        return self._ctx

    # --- prompt -> chunks -----------------------------------------------------------------------------------
    def tokenize(
        self, prompt: str, images: Sequence[RGBImage], add_special: bool = False, parse_special: bool = True
    ) -> list[Chunk]:
        """Split a prompt whose images are marked with `self.marker`, one marker per image, into chunks in
        order: token lists for text (with the model's image delimiters) and ImageChunks. `add_special` adds BOS
        when the vocabulary wants one (off: chat templates write their own)."""
        texts = prompt.split(self.marker)
        if len(texts) - 1 != len(images):
            raise ValueError(f"prompt has {len(texts) - 1} image markers ({self.marker}) for {len(images)} images")
        parts: list[str | RGBImage] = [texts[0]]
        for image, text in zip(images, texts[1:], strict=True):
            parts += [image, text]
        return self.tokenize_parts(parts, add_special, parse_special)

    def tokenize_parts(
        self, parts: Sequence[str | RGBImage], add_special: bool = False, parse_special: bool = True
    ) -> list[Chunk]:
        """Like `tokenize`, from text and images in order (no markers: text is only ever text)."""
        parts = [p for p in parts if not isinstance(p, str) or p]  # mtmd drops empty text too
        texts: list[bytes] = []  # kept alive until mtmd_tokenize_from_parts returns
        c_texts: list[M.mtmd_input_text] = []
        c_parts = (M.mtmd_input_part * len(parts))()
        bitmaps: list[int] = []
        chunks = M.mtmd_input_chunks_init()
        try:
            for i, part in enumerate(parts):
                if isinstance(part, str):
                    data = part.encode("utf-8")
                    texts.append(data)
                    c_texts.append(M.mtmd_input_text(data, len(data), add_special, parse_special))
                    c_parts[i].text = ctypes.pointer(c_texts[-1])
                else:
                    bitmaps.append(self._bitmap(part))
                    c_parts[i].bitmap = bitmaps[-1]
            part_ptrs = (ctypes.POINTER(M.mtmd_input_part) * len(parts))(*[ctypes.pointer(p) for p in c_parts])
            rc = M.mtmd_tokenize_from_parts(self._context(), chunks, part_ptrs, len(parts), add_special)
            if rc != 0:
                raise _failure(f"could not tokenize the prompt (mtmd_tokenize_from_parts: {rc})")
            return self._collect(chunks, [p for p in parts if isinstance(p, RGBImage)])
        finally:
            M.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                M.mtmd_bitmap_free(bitmap)

    def _bitmap(self, image: RGBImage) -> int:
        pixels = ctypes.c_char_p(image.data)  # points into the bytes object, which outlives the call
        bitmap = M.mtmd_bitmap_init(image.width, image.height, ctypes.cast(pixels, ctypes.POINTER(ctypes.c_uint8)))
        if not bitmap:
            raise MtmdError("mtmd_bitmap_init failed")
        M.mtmd_bitmap_set_id(bitmap, image.id.encode())  # each chunk of this image carries it
        return bitmap

    def _collect(self, chunks: int, images: list[RGBImage]) -> list[Chunk]:
        """Our own chunks from mtmd's: tokens copied out, image chunks copied (ours to free). Tiles of one image
        share its id: they are told apart by their index within the image."""
        tiles_per_image = Counter(
            M.mtmd_input_chunk_get_id(M.mtmd_input_chunks_get(chunks, i)).decode()
            for i in range(M.mtmd_input_chunks_size(chunks))
            if M.mtmd_input_chunk_get_type(M.mtmd_input_chunks_get(chunks, i)) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE
        )
        occurrences = Counter(image.id for image in images)
        seen: Counter[str] = Counter()
        out: list[Chunk] = []
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            kind = M.mtmd_input_chunk_get_type(chunk)
            if kind == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                tokens = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                out.append(list(tokens[: n.value]))
            elif kind == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                image_id = M.mtmd_input_chunk_get_id(chunk).decode()
                tile = seen[image_id] % (tiles_per_image[image_id] // occurrences[image_id])
                seen[image_id] += 1
                copy = M.mtmd_input_chunk_copy(chunk)
                if not copy:
                    raise MtmdError("mtmd_input_chunk_copy failed")
                out.append(ImageChunk(self, copy, image_id, tile))
            else:
                raise MtmdError(f"unexpected mtmd chunk type {kind} (audio?) in an image prompt")
        return out

    # --- image -> embeddings -> KV --------------------------------------------------------------------------
    def encode(self, chunk: ImageChunk) -> np.ndarray:
        """Run the vision encoder on one image chunk: float32 (n_tokens, n_embd), a copy ours to keep."""
        with self._lock:
            ctx = self._context()
            if M.mtmd_encode_chunk(ctx, chunk.ptr) != 0:
                raise _failure("could not encode the image")
            out = M.mtmd_get_output_embd(ctx)
            return np.ctypeslib.as_array(out, shape=(chunk.n_tokens, self.n_embd)).copy()

    def decode_image(
        self,
        llama_ctx: int | ctypes.c_void_p,
        chunk: ImageChunk,
        embd: np.ndarray,
        pos0: int,
        seq_id: int,
        logits_last: bool = False,
    ) -> int:
        """Decode an encoded image into sequence `seq_id` of a llama context from position pos0, in batches of
        the context's n_batch, with non-causal attention if the model wants it. Returns the position after it.
        With `logits_last`, the image's last row outputs logits (batch index: its row within the last batch)."""
        if embd.shape != (chunk.n_tokens, self.n_embd):
            raise ValueError(f"embeddings of shape {embd.shape} for an image of {chunk.n_tokens} x {self.n_embd}")
        n_batch = C.llama_n_batch(llama_ctx)
        if self.uses_non_causal:
            limit = min(n_batch, C.llama_n_ubatch(llama_ctx))
            if chunk.n_tokens > limit:
                # The image attends to itself as a whole: it must fit one micro-batch (llama.cpp asserts).
                raise MtmdError(f"image of {chunk.n_tokens} tokens exceeds the context's batch ({limit})")
            n_batch = chunk.n_tokens
        positions = chunk.positions(pos0)
        batch = EmbdBatch(min(n_batch, chunk.n_tokens), self.n_embd, self.n_pos_per_embd)
        if self.uses_non_causal:
            C.llama_set_causal_attn(llama_ctx, False)
        try:
            for start in range(0, chunk.n_tokens, n_batch):
                end = min(start + n_batch, chunk.n_tokens)
                batch.clear()
                batch.add(embd[start:end], positions[:, start:end], seq_id, logits_last and end == chunk.n_tokens)
                rc = batch.decode(llama_ctx)
                if rc != 0:
                    raise MtmdError(f"llama_decode of an image failed ({rc})")
        finally:
            if self.uses_non_causal:
                C.llama_set_causal_attn(llama_ctx, True)
        return pos0 + chunk.n_pos


class EmbdBatch:
    """A llama_batch of embedding rows (images) for llama_decode, in numpy arrays this object owns: nothing to
    free. Text tokens go in another batch (llama.py's Batch): llama.cpp refuses batches that mix the two. Each
    row belongs to one sequence; rows of several sequences may share a batch (with causal attention)."""

    def __init__(self, capacity: int, n_embd: int, n_pos_per_embd: int = 1) -> None:
        self.capacity = capacity
        self.size = 0
        self._embd = np.zeros((capacity, n_embd), dtype=np.float32)
        self._pos = np.zeros((n_pos_per_embd, capacity), dtype=np.int32)
        self._n_seq_id = np.ones(capacity, dtype=np.int32)
        self._seq_id = np.zeros(capacity, dtype=np.int32)
        self._logits = np.zeros(capacity, dtype=np.int8)
        # llama_batch.seq_id is an array of pointers, one per row, each to that row's one sequence id.
        base = self._seq_id.ctypes.data
        self._seq_ptrs = (ctypes.POINTER(C.llama_seq_id) * capacity)(
            *[ctypes.cast(base + 4 * i, ctypes.POINTER(C.llama_seq_id)) for i in range(capacity)]
        )

    def clear(self) -> None:
        self.size = 0

    def add(self, embd: np.ndarray, positions: np.ndarray, seq_id: int, logits_last: bool = False) -> int:
        """Append rows (k, n_embd) at positions (n_pos_per_embd, k); returns the batch index of the last row."""
        k = embd.shape[0]
        if self.size + k > self.capacity:
            raise ValueError(f"{k} rows do not fit ({self.size} of {self.capacity} used)")
        if positions.shape != (self._pos.shape[0], k):
            raise ValueError(f"positions of shape {positions.shape} for {k} rows")
        rows = slice(self.size, self.size + k)
        self._embd[rows] = embd
        self._pos[:, rows] = positions
        self._seq_id[rows] = seq_id
        self._logits[rows] = 0
        self.size += k
        self._logits[self.size - 1] = logits_last
        return self.size - 1

    def decode(self, llama_ctx: int | ctypes.c_void_p) -> int:
        """llama_decode the rows added so far; its return code (0: done)."""
        n = self.size
        if n > C.llama_n_batch(llama_ctx):
            raise ValueError(f"{n} rows exceed the context's n_batch ({C.llama_n_batch(llama_ctx)})")  # else: abort
        # Section-major positions: all rows' first section, then all rows' second, ...
        pos = np.ascontiguousarray(self._pos[:, :n]).reshape(-1)
        batch = C.llama_batch(
            n_tokens=n,
            embd=self._embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            pos=pos.ctypes.data_as(ctypes.POINTER(C.llama_pos)),
            n_seq_id=self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(C.llama_seq_id))),
            logits=self._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        return C.llama_decode(llama_ctx, batch)
