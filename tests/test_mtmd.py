"""Images through llama.cpp's mtmd (engine/mtmd.py), for real: the tiny random-weight text model and projectors
of tests/tiny_vision.py are loaded, images are tokenized, encoded, and decoded into a sequence's KV cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp as C
import numpy as np
import pytest

from llamaserve.engine.llama import Batch, ContextConfig, LlamaModel
from llamaserve.engine.mtmd import EmbdBatch, ImageChunk, MtmdError, Projector, RGBImage, default_marker
from tests import tiny_vision

PREFIX = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nLook: "
SUFFIX = " What is it?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def make_image(seed: int, width: int = 40, height: int = 24) -> RGBImage:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return RGBImage(pixels.tobytes(), width, height)


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaModel]:
    text, _ = tiny_vision.build_tiny_vision()
    m = LlamaModel(str(text), ContextConfig(n_ctx_seq=256, n_seq_max=2, n_batch=64, n_threads=2))
    yield m
    m.close()


@pytest.fixture(scope="module")
def small_batch_model() -> Iterator[LlamaModel]:
    """The same text model with batches of 3 tokens: smaller than any tiny image."""
    text, _ = tiny_vision.build_tiny_vision()
    m = LlamaModel(str(text), ContextConfig(n_ctx_seq=256, n_seq_max=1, n_batch=3, n_threads=2))
    yield m
    m.close()


@pytest.fixture(scope="module")
def llava(model: LlamaModel) -> Iterator[Projector]:
    p = Projector(tiny_vision.tiny_mmproj_gguf("mlp"), model.model, n_threads=2)
    yield p
    p.close()


@pytest.fixture(scope="module")
def gemma3(model: LlamaModel) -> Iterator[Projector]:
    p = Projector(tiny_vision.tiny_mmproj_gguf("gemma3"), model.model, n_threads=2)
    yield p
    p.close()


def only_image(chunks: list[list[int] | ImageChunk]) -> ImageChunk:
    images = [c for c in chunks if isinstance(c, ImageChunk)]
    assert len(images) == 1
    return images[0]


def decode_text(model: LlamaModel, tokens: list[int], pos0: int, seq_id: int, logits_last: bool = False) -> int:
    """Decode tokens n_batch at a time (llama.cpp aborts on a larger batch); returns the next position."""
    n_batch = model.config.n_batch
    batch = Batch(n_batch)
    try:
        for start in range(0, len(tokens), n_batch):
            batch.clear()
            for i in range(start, min(start + n_batch, len(tokens))):
                batch.add(tokens[i], pos0 + i, seq_id, logits_last and i == len(tokens) - 1)
            assert model.decode(batch) == 0
    finally:
        batch.free()
    return pos0 + len(tokens)


def text_logits(model: LlamaModel, tokens: list[int], pos0: int, seq_id: int) -> np.ndarray:
    """Decode tokens; the logits after the last one."""
    decode_text(model, tokens, pos0, seq_id, logits_last=True)
    return np.array(model.logits((len(tokens) - 1) % model.config.n_batch))


def next_token_logits(model: LlamaModel, projector: Projector, image: RGBImage, seq_id: int = 0) -> np.ndarray:
    """Prefill PREFIX, the image, SUFFIX into a fresh sequence; the logits after SUFFIX."""
    model.kv_remove(seq_id)
    before, chunk, after = projector.tokenize(PREFIX + projector.marker + SUFFIX, [image])
    assert isinstance(before, list) and isinstance(chunk, ImageChunk) and isinstance(after, list)
    pos = decode_text(model, before, 0, seq_id)
    pos = projector.decode_image(model.ctx, chunk, chunk.encode(), pos, seq_id)
    return text_logits(model, after, pos, seq_id)


# --- loading -------------------------------------------------------------------------------------------------
def test_projector_loads(llava: Projector, gemma3: Projector, model: LlamaModel) -> None:
    assert llava.marker == default_marker() == "<__media__>"
    assert llava.n_embd == gemma3.n_embd == int(model.meta("llama.embedding_length") or 0) == 64
    assert not llava.uses_non_causal and not llava.uses_mrope and llava.n_pos_per_embd == 1
    # Gemma 3 attends over an image bidirectionally; neither uses M-RoPE (the text model is a Llama).
    assert gemma3.uses_non_causal and not gemma3.uses_mrope


@pytest.mark.parametrize(
    "content",
    [b"", b"definitely not a gguf file" * 100, b"GGUF" + bytes(range(256)) * 4],
    ids=["empty", "garbage", "bad-header"],
)
def test_corrupt_projector_is_a_clean_error(tmp_path: Path, model: LlamaModel, content: bytes) -> None:
    path = tmp_path / "mmproj.gguf"
    path.write_bytes(content)
    with pytest.raises(MtmdError, match="could not load projector"):
        Projector(path, model.model, n_threads=1)


def test_truncated_projector_header_is_a_clean_error(tmp_path: Path, model: LlamaModel) -> None:
    path = tmp_path / "mmproj.gguf"
    path.write_bytes(tiny_vision.tiny_mmproj_gguf("mlp").read_bytes()[:300])
    with pytest.raises(MtmdError, match="could not load projector"):
        Projector(path, model.model, n_threads=1)


def test_mismatched_projector_is_a_clean_error(tmp_path: Path, model: LlamaModel) -> None:
    # Built for a text model of width 32: mtmd refuses it for our width-64 model, and says so.
    with pytest.raises(MtmdError, match=r"mismatch between text model \(n_embd = 64\) and mmproj \(n_embd = 32\)"):
        Projector(tiny_vision.tiny_mmproj_gguf("mlp", n_embd_text=32, cache_dir=tmp_path), model.model, n_threads=1)


def test_text_model_as_projector_is_a_clean_error(model: LlamaModel) -> None:
    with pytest.raises(MtmdError, match="could not load projector"):
        Projector(model.path, model.model, n_threads=1)


def test_missing_projector_is_a_clean_error(tmp_path: Path, model: LlamaModel) -> None:
    with pytest.raises(MtmdError, match="no projector file"):
        Projector(tmp_path / "absent.gguf", model.model, n_threads=1)


# --- tokenizing ------------------------------------------------------------------------------------------------
def test_prompt_with_one_image_is_text_image_text(llava: Projector, model: LlamaModel) -> None:
    chunks = llava.tokenize(PREFIX + llava.marker + SUFFIX, [make_image(1)])
    assert [type(c) for c in chunks] == [list, ImageChunk, list]
    # Each side tokenized as the text model tokenizes it: special tokens parsed, no BOS added.
    assert chunks[0] == model.tokenize(PREFIX, add_special=False)
    assert chunks[2] == model.tokenize(SUFFIX, add_special=False)
    assert chunks[0][0] == model.bos  # written by the prompt, not added


def test_add_special_adds_bos(llava: Projector, model: LlamaModel) -> None:
    chunks = llava.tokenize(llava.marker + "hi", [make_image(1)], add_special=True)
    assert chunks[0] == [model.bos] and isinstance(chunks[1], ImageChunk) and chunks[2] == model.tokenize("hi", False)


def test_gemma3_wraps_the_image_in_its_delimiters(gemma3: Projector, model: LlamaModel) -> None:
    before, _, after = gemma3.tokenize(PREFIX + gemma3.marker + SUFFIX, [make_image(1)])
    # Text the Llama vocabulary has no special token for: tokenized as plain text, each part on its own.
    assert before == model.tokenize(PREFIX, False) + model.tokenize("<start_of_image>", False)
    assert after == model.tokenize("<end_of_image>", False) + model.tokenize(SUFFIX, False)


def test_llama32_vision_image_token_is_text_only_the_marker_places_images(llava: Projector, model: LlamaModel) -> None:
    # Llama 3.2 Vision writes <|image|> where an image goes; mtmd has no mllama support, so <|image|> stays a
    # special token and only the marker places images.
    image_token = model.tokenize("<|image|>", add_special=False)
    assert len(image_token) == 1
    chunks = llava.tokenize("<|image|>" + llava.marker + "Describe.", [make_image(1)])
    assert chunks[0] == image_token and isinstance(chunks[1], ImageChunk)


def test_image_token_count_follows_the_projector_config(llava: Projector, gemma3: Projector) -> None:
    for projector, kind in ((llava, "mlp"), (gemma3, "gemma3")):
        for image in (make_image(1), make_image(2, width=7, height=300)):  # any size: resized to 32x32
            chunk = only_image(projector.tokenize(projector.marker, [image]))
            assert chunk.n_tokens == chunk.n_pos == tiny_vision.image_tokens(kind)
    assert tiny_vision.image_tokens("mlp") == 16 and tiny_vision.image_tokens("gemma3") == 4


def test_marker_count_must_match_images(llava: Projector) -> None:
    with pytest.raises(ValueError, match="2 image markers"):
        llava.tokenize(llava.marker * 2, [make_image(1)])


def test_parts_keep_a_literal_marker_as_text(llava: Projector, model: LlamaModel) -> None:
    # A user who types the marker gets text, not an image slot.
    chunks = llava.tokenize_parts(["say " + llava.marker, make_image(1), "ok"])
    assert chunks[0] == model.tokenize("say " + llava.marker, False) and isinstance(chunks[1], ImageChunk)


def test_image_size_is_checked() -> None:
    with pytest.raises(ValueError, match="needs 12 bytes"):
        RGBImage(b"\0" * 11, 2, 2)
    with pytest.raises(ValueError, match="positive"):
        RGBImage(b"", 0, 5)


def test_ids_are_content_hashes(llava: Projector) -> None:
    a, b = make_image(1), make_image(2)
    chunks = llava.tokenize(f"{llava.marker} and {llava.marker} then {llava.marker}", [a, b, RGBImage(a.data, 40, 24)])
    ids = [c.id for c in chunks if isinstance(c, ImageChunk)]
    assert ids == [a.id, b.id, a.id] and a.id != b.id
    # Same bytes in another shape is another image.
    assert RGBImage(a.data, 24, 40).id != a.id


# --- encoding --------------------------------------------------------------------------------------------------
def test_embeddings_are_deterministic_and_differ_between_images(llava: Projector, gemma3: Projector) -> None:
    for projector in (llava, gemma3):
        first = only_image(projector.tokenize(projector.marker, [make_image(1)])).encode()
        again = only_image(projector.tokenize(projector.marker, [make_image(1)])).encode()
        other = only_image(projector.tokenize(projector.marker, [make_image(2)])).encode()
        assert first.dtype == np.float32 and first.shape[1] == projector.n_embd and np.isfinite(first).all()
        assert np.array_equal(first, again)
        assert not np.allclose(first, other, atol=1e-3)


def test_closed_chunk_and_projector_refuse_to_encode(model: LlamaModel) -> None:
    projector = Projector(tiny_vision.tiny_mmproj_gguf("mlp"), model.model, n_threads=1, warmup=False)
    chunk = only_image(projector.tokenize(projector.marker, [make_image(1)]))
    kept = only_image(projector.tokenize(projector.marker, [make_image(1)]))
    chunk.close()
    chunk.close()  # idempotent
    with pytest.raises(MtmdError, match="chunk is closed"):
        chunk.encode()
    projector.close()
    with pytest.raises(MtmdError, match="projector is closed"):
        kept.encode()
    kept.close()  # freeing a chunk after its projector is fine: it owns its data


# --- decoding into a sequence ----------------------------------------------------------------------------------
def test_image_embeddings_decode_and_steer_the_next_token(model: LlamaModel, llava: Projector) -> None:
    a = next_token_logits(model, llava, make_image(1))
    b = next_token_logits(model, llava, make_image(2))
    again = next_token_logits(model, llava, make_image(1))
    assert np.array_equal(a, again)
    assert np.abs(a - b).max() > 1e-3, "the image did not reach the logits"


def test_sequence_positions_after_an_image(model: LlamaModel, llava: Projector) -> None:
    next_token_logits(model, llava, make_image(1))
    before, chunk, after = llava.tokenize(PREFIX + llava.marker + SUFFIX, [make_image(1)])
    assert isinstance(chunk, ImageChunk)
    assert C.llama_memory_seq_pos_max(model.memory, 0) == len(before) + chunk.n_pos + len(after) - 1


def test_images_of_two_sequences_share_a_batch(model: LlamaModel, llava: Projector) -> None:
    """Both sequences' images in one embedding batch, then both suffixes in one token batch: the same logits as
    one sequence at a time."""
    images = [make_image(1), make_image(2)]
    alone = [next_token_logits(model, llava, image, seq_id=0) for image in images]
    model.kv_remove(0)
    model.kv_remove(1)
    split = [llava.tokenize(PREFIX + llava.marker + SUFFIX, [image]) for image in images]
    for seq_id, (before, _, _) in enumerate(split):
        decode_text(model, before, 0, seq_id)
    embd_batch = EmbdBatch(64, llava.n_embd)
    for seq_id, (before, chunk, _) in enumerate(split):
        assert isinstance(chunk, ImageChunk)
        embd_batch.add(chunk.encode(), chunk.positions(len(before)), seq_id)
    assert embd_batch.decode(model.ctx) == 0
    batch = Batch(64)
    last = []
    for seq_id, (before, chunk, after) in enumerate(split):
        assert isinstance(chunk, ImageChunk)
        for i, token in enumerate(after):
            index = batch.add(token, len(before) + chunk.n_pos + i, seq_id, i == len(after) - 1)
        last.append(index)
    assert model.decode(batch) == 0
    batch.free()
    for seq_id, index in enumerate(last):
        np.testing.assert_allclose(np.array(model.logits(index)), alone[seq_id], atol=1e-4)


def test_image_split_over_small_batches_gives_the_same_logits(
    model: LlamaModel, small_batch_model: LlamaModel, llava: Projector
) -> None:
    projector = Projector(tiny_vision.tiny_mmproj_gguf("mlp"), small_batch_model.model, n_threads=2)
    try:
        whole = next_token_logits(model, llava, make_image(3))
        split = next_token_logits(small_batch_model, projector, make_image(3))  # 16 image rows, 3 per decode
        np.testing.assert_allclose(split, whole, atol=1e-4)
    finally:
        projector.close()


def test_gemma3_image_is_decoded_with_non_causal_attention(model: LlamaModel, gemma3: Projector) -> None:
    image = make_image(4)
    non_causal = next_token_logits(model, gemma3, image)
    # The same image decoded causally (our batch, without decode_image's switch) reaches other logits.
    model.kv_remove(0)
    before, chunk, after = gemma3.tokenize(PREFIX + gemma3.marker + SUFFIX, [image])
    assert isinstance(chunk, ImageChunk)
    pos = decode_text(model, before, 0, 0)
    embd_batch = EmbdBatch(chunk.n_tokens, gemma3.n_embd)
    embd_batch.add(chunk.encode(), chunk.positions(pos), 0)
    assert embd_batch.decode(model.ctx) == 0
    causal = text_logits(model, after, pos + chunk.n_pos, 0)
    # Small (about 3e-4: 4 image rows, a 2-layer model of small random weights) but structural, not rounding.
    assert np.abs(non_causal - causal).max() > 1e-5
    # decode_image restored causal attention for the text after it.
    assert next_token_logits(model, gemma3, image).tolist() == non_causal.tolist()


def test_non_causal_image_larger_than_the_batch_is_refused(small_batch_model: LlamaModel) -> None:
    # llama.cpp aborts the process on a non-causal batch larger than n_ubatch; decode_image raises instead.
    projector = Projector(tiny_vision.tiny_mmproj_gguf("gemma3"), small_batch_model.model, n_threads=1)
    try:
        chunk = only_image(projector.tokenize(projector.marker, [make_image(1)]))
        with pytest.raises(MtmdError, match="exceeds the context's batch"):
            projector.decode_image(small_batch_model.ctx, chunk, chunk.encode(), 0, 0)
    finally:
        projector.close()


def test_embedding_batch_larger_than_n_batch_is_refused(small_batch_model: LlamaModel) -> None:
    # llama.cpp aborts the process on a batch larger than n_batch; EmbdBatch.decode raises instead.
    batch = EmbdBatch(4, 64)
    batch.add(np.zeros((4, 64), dtype=np.float32), np.arange(4, dtype=np.int32)[None, :], 0)
    with pytest.raises(ValueError, match="exceed the context's n_batch"):
        batch.decode(small_batch_model.ctx)
