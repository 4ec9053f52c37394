"""A tiny vision model pair with random weights, for tests: the tiny Llama 3 text model (tests/tiny_llama3.py) and
a tiny CLIP-style projector ("mmproj") GGUF that llama.cpp's multimodal library (mtmd) loads.

Two projector types, both the simplest of their kind in llama.cpp's `tools/mtmd/clip.cpp`:
- "mlp" (LLaVA 1.5): a ViT, then two linear layers with GELU (`mm.0`, `mm.2`). One token per patch: a 32x32 image
  in 8x8 patches is 16 image tokens. Causal attention in the text model, like any text.
- "gemma3" (Gemma 3): a ViT, an average pool (`clip.vision.projector.scale_factor` per side), an RMS norm and one
  projection. 32x32 in 8x8 patches pooled 2x2 is 4 image tokens. mtmd asks for non-causal attention over them.

The ViT is 2 blocks of width 32 (the LLaVA graph runs all but the last, as LLaVA takes the penultimate layer's
features); the projection ends at the text model's width (64), which mtmd checks at load. The tensor names, shapes
and metadata keys are the ones clip.cpp reads (`clip-impl.h`); numpy shapes are ggml's `ne` reversed.

Files are built once and cached beside tiny_llama3's (`$LLAMASERVE_TEST_CACHE` or `~/.cache/llamaserve-tests/`).
Run `python -m tests.tiny_vision` (from the repository root) to build them and print where they are.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from tests import tiny_llama3

# Bump when a projector file's content changes: old caches are then ignored.
FORMAT_VERSION = "1"

Projector = Literal["mlp", "gemma3"]

IMAGE_SIZE = 32  # mtmd resizes every image to this square
PATCH_SIZE = 8
N_EMBD = 32  # ViT width
N_HEAD = 2
N_FF = 64
N_LAYER = 2
GEMMA3_POOL = 2  # patches per side pooled into one token
SEED = 4321


def image_tokens(projector: Projector) -> int:
    """Embedding tokens one image becomes: one per patch for "mlp", one per pooled 2x2 patches for "gemma3"."""
    side = IMAGE_SIZE // PATCH_SIZE
    if projector == "gemma3":
        side //= GEMMA3_POOL
    return side * side


def build_tiny_mmproj(path: Path, projector: Projector = "mlp", n_embd_text: int = tiny_llama3.N_EMBD) -> None:
    import gguf  # test-only dependency

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name(f"tiny-{projector}-mmproj-random")
    # clip.cpp reads these with exact types (u32, f32, bool, f32 arrays); a wrong type aborts the process.
    w.add_string("clip.projector_type", projector)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    w.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    w.add_uint32("clip.vision.embedding_length", N_EMBD)
    w.add_uint32("clip.vision.feed_forward_length", N_FF)
    w.add_uint32("clip.vision.block_count", N_LAYER)
    w.add_uint32("clip.vision.projection_dim", n_embd_text)
    w.add_uint32("clip.vision.attention.head_count", N_HEAD)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    if projector == "gemma3":
        w.add_uint32("clip.vision.projector.scale_factor", GEMMA3_POOL)

    rng = np.random.default_rng(SEED)

    def matrix(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * 0.2

    def vector(n: int, value: float | None = None) -> np.ndarray:
        return np.full(n, value, dtype=np.float32) if value is not None else matrix(n) * 0.1

    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    # ggml_conv_2d kernel [KW, KH, IC, OC] -> numpy (OC, IC, KH, KW).
    w.add_tensor("v.patch_embd.weight", matrix(N_EMBD, 3, PATCH_SIZE, PATCH_SIZE))
    w.add_tensor("v.patch_embd.bias", vector(N_EMBD))
    w.add_tensor("v.position_embd.weight", matrix(n_patches, N_EMBD))
    for i in range(N_LAYER):
        p = f"v.blk.{i}"
        for norm in ("ln1", "ln2"):
            w.add_tensor(f"{p}.{norm}.weight", vector(N_EMBD, 1.0))
            w.add_tensor(f"{p}.{norm}.bias", vector(N_EMBD, 0.0))
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(f"{p}.{proj}.weight", matrix(N_EMBD, N_EMBD))
            w.add_tensor(f"{p}.{proj}.bias", vector(N_EMBD))
        # ffn_up maps N_EMBD -> N_FF and ffn_down back (N_FF != N_EMBD, or clip.cpp "fixes" a legacy swap).
        w.add_tensor(f"{p}.ffn_up.weight", matrix(N_FF, N_EMBD))
        w.add_tensor(f"{p}.ffn_up.bias", vector(N_FF))
        w.add_tensor(f"{p}.ffn_down.weight", matrix(N_EMBD, N_FF))
        w.add_tensor(f"{p}.ffn_down.bias", vector(N_EMBD))

    if projector == "mlp":
        # LLaVA: mm.0 (vision -> hidden), GELU, mm.2 (hidden -> text width); mtmd reads the output width off mm.2.
        w.add_tensor("mm.0.weight", matrix(n_embd_text, N_EMBD))
        w.add_tensor("mm.0.bias", vector(n_embd_text))
        w.add_tensor("mm.2.weight", matrix(n_embd_text, n_embd_text))
        w.add_tensor("mm.2.bias", vector(n_embd_text))
    else:
        # Gemma 3: post-ViT norm, RMS norm of the pooled tokens, and a projection used transposed
        # (ggml ne [text, vision] -> numpy (vision, text)).
        w.add_tensor("v.post_ln.weight", vector(N_EMBD, 1.0))
        w.add_tensor("v.post_ln.bias", vector(N_EMBD, 0.0))
        w.add_tensor("mm.soft_emb_norm.weight", vector(N_EMBD, 1.0))
        w.add_tensor("mm.input_projection.weight", matrix(N_EMBD, n_embd_text))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _build_once(path: Path, build: Callable[[Path], None]) -> Path:
    """Build `path` unless cached. Built beside the target and renamed: concurrent test processes never see a
    half-written file."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        build(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def tiny_mmproj_gguf(
    projector: Projector = "mlp", n_embd_text: int = tiny_llama3.N_EMBD, cache_dir: Path | None = None
) -> Path:
    """The cached tiny projector (a few hundred KB, built in well under a second)."""
    directory = cache_dir or tiny_llama3.cache_dir()
    path = directory / f"tiny-mmproj-{projector}-to{n_embd_text}-v{FORMAT_VERSION}.gguf"
    return _build_once(path, lambda p: build_tiny_mmproj(p, projector, n_embd_text))


def build_tiny_vision(cache_dir: Path | None = None, projector: Projector = "mlp") -> tuple[Path, Path]:
    """(text model GGUF, mmproj GGUF), both cached in `cache_dir` (default: tiny_llama3's cache, so the text
    model is the very file tiny_llama3_gguf() returns)."""
    if cache_dir is None:
        text = tiny_llama3.tiny_llama3_gguf()
    else:
        # Named as tiny_llama3 names it: the tokenizer's hash keys the file.
        digest = hashlib.sha256(tiny_llama3.tokenizer_model_path().read_bytes()).hexdigest()[:12]
        name = f"tiny-llama3-v{tiny_llama3.FORMAT_VERSION}-{digest}.gguf"
        text = _build_once(cache_dir / name, tiny_llama3.build_tiny_llama3_gguf)
    return text, tiny_mmproj_gguf(projector, cache_dir=cache_dir)


if __name__ == "__main__":
    for kind in ("mlp", "gemma3"):
        text_path, mmproj_path = build_tiny_vision(projector=kind)
        print(f"{kind}: {text_path} + {mmproj_path} ({image_tokens(kind)} tokens per image)")
