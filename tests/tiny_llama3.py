"""A tiny Llama-architecture GGUF with random weights and the real Llama 3 vocabulary, for tests.

The vocabulary is Meta's own: the tiktoken BPE ranks of `llama_models/llama3/tokenizer.model` (shipped in the
`llama-models` wheel) turned into a GGUF "gpt2"-style tokenizer the way llama.cpp's converter does for Llama 3
(tokens as byte-to-unicode strings, merges rebuilt from the ranks as transformers' TikTokenConverter does,
pre-tokenizer "llama-bpe"), plus Meta's 256 special tokens (CONTROL), `<|begin_of_text|>` as BOS and
`<|eot_id|>` / `<|eom_id|>` / `<|end_of_text|>` as end of generation. The network is 2 layers of width 64 with
tied embeddings: it writes nonsense, but it runs, so the Llama 3.1 path runs for real in tests.

`tiny_llama3_gguf()` builds the file once and caches it (about 25 MB) under `$LLAMASERVE_TEST_CACHE` or
`~/.cache/llamaserve-tests/`, keyed by a version string and a hash of the tokenizer file; it is never committed.
Run `python tests/tiny_llama3.py` to build it and print where it is and how long it took.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

# Bump when the file's content changes (architecture, metadata, weights): old caches are then ignored.
FORMAT_VERSION = "1"

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_LAYER = 2
N_CTX_TRAIN = 8192
SEED = 1234

# Meta's special tokens, in id order from 128000 (llama_models.llama3.tokenizer.Tokenizer).
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
] + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 12)]


def tokenizer_model_path() -> Path:
    """Meta's Llama 3 tokenizer (tiktoken BPE ranks), as the llama-models wheel ships it."""
    path = Path(str(resources.files("llama_models.llama3") / "tokenizer.model"))
    if not path.is_file():
        raise FileNotFoundError(f"llama-models does not ship {path}")
    return path


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which GGUF BPE vocabularies use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[list[str], list[str]]:
    """Tokens in rank order, and BPE merges that make llama.cpp's BPE reproduce tiktoken's (transformers'
    TikTokenConverter.extract_vocab_merges_from_model): for every token, every split into two tokens, ordered
    by the rank of the token they make, so the pair that forms the lowest-ranked token always merges first.
    Tokens BPE never builds from parts (tiktoken finds them whole) are matched whole by llama.cpp too: its
    llama-bpe pre-tokenizer looks a whole piece up in the vocabulary before merging."""
    byte_char = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in by_rank] != list(range(len(by_rank))):
        raise ValueError("tokenizer.model ranks are not 0..n-1")
    tokens = [text(b) for b, _ in by_rank]
    merges: list[str] = []
    for token, _ in by_rank:
        splits = [
            (ranks[token[:i]], ranks[token[i:]], i)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        for _, _, i in sorted(splits):
            merges.append(f"{text(token[:i])} {text(token[i:])}")
    return tokens, merges


def build_tiny_llama3_gguf(path: Path, chat_template: str | None = None) -> None:
    import gguf  # test-only dependency

    ranks = load_ranks(tokenizer_model_path())
    tokens, merges = vocab_and_merges(ranks)
    n_base = len(tokens)
    special_id = {t: n_base + i for i, t in enumerate(SPECIAL_TOKENS)}
    tokens += SPECIAL_TOKENS
    types = [gguf.TokenType.NORMAL] * n_base + [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama3-random")
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(special_id["<|begin_of_text|>"])
    # As in Meta's instruct GGUFs: generation ends at <|eot_id|>; <|eom_id|> and <|end_of_text|> end it too.
    w.add_eos_token_id(special_id["<|eot_id|>"])
    w.add_eot_token_id(special_id["<|eot_id|>"])
    w.add_eom_token_id(special_id["<|eom_id|>"])
    w.add_pad_token_id(special_id["<|finetune_right_pad_id|>"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    rng = np.random.default_rng(SEED)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    head_dim = N_EMBD // N_HEAD
    # No output.weight: llama.cpp then ties the output projection to token_embd.
    w.add_tensor("token_embd.weight", matrix(n_vocab, N_EMBD))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", matrix(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_k.weight", matrix(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_v.weight", matrix(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_output.weight", matrix(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_up.weight", matrix(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_down.weight", matrix(N_EMBD, N_FF))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def cache_dir() -> Path:
    env = os.environ.get("LLAMASERVE_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llamaserve-tests"


def tiny_llama3_gguf() -> Path:
    """The cached tiny Llama 3 GGUF, built on first use (a few seconds)."""
    digest = hashlib.sha256(tokenizer_model_path().read_bytes()).hexdigest()[:12]
    path = cache_dir() / f"tiny-llama3-v{FORMAT_VERSION}-{digest}.gguf"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent test processes never see a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        build_tiny_llama3_gguf(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


if __name__ == "__main__":
    t0 = time.perf_counter()
    out = cache_dir() / "tiny-llama3-build-timing.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    build_tiny_llama3_gguf(out)
    print(f"built {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    out.unlink()
    print(tiny_llama3_gguf())
