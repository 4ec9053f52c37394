"""One GPU's share of a Llama 3.1 405B decode step at TP=8, the part docs/deploy-405b.md's throughput arithmetic
models: every linear layer of the 126 blocks and the LM head, sharded 8 ways, in Meta's FP8 recipe (the FFNs of
blocks 1-124 in FP8 with row-wise weight scales and per-token activation scales; the attention projections, the
first and last FFN and the LM head in BF16), and each sequence's attention over an L-token KV cache (one KV head
per GPU). Random weights. Not included: the two all-reduces per block (one GPU has no peers), sampling and the
scheduler. The step is captured once as a CUDA graph (as vLLM runs decode) and replayed; the table sets its time
against the bandwidth model t = bytes read / HBM bandwidth.

    python bench/h100_decode_shard.py             # on one H100: about 60 GB of GPU memory
    python bench/h100_decode_shard.py --dry       # tiny shapes on the CPU: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
HBM_BYTES_PER_S = 3.35e12  # H100 SXM datasheet


@dataclass(frozen=True)
class Shape:
    """One TP=8 shard of Llama 3.1 405B (or a tiny stand-in for --dry)."""

    layers: int = 126
    d: int = 16384
    heads: int = 128 // 8  # query heads on this GPU
    head_dim: int = 128
    kv_heads: int = 1  # 8 KV heads / 8 GPUs (step() relies on it being 1)
    ffn: int = 53248 // 8
    vocab: int = 128256 // 8
    kv_layers: int = 16  # distinct KV caches, cycled: each is larger than L2, so every read comes from HBM


TINY = Shape(layers=3, d=256, heads=2, head_dim=64, kv_heads=1, ffn=512, vocab=1024, kv_layers=2)


@dataclass
class Block:
    qkv: torch.Tensor  # (d, (heads + 2 kv_heads) · head_dim) bf16
    o: torch.Tensor  # (heads · head_dim, d) bf16
    gate_up: torch.Tensor  # (d, 2 ffn): bf16, or fp8 as the transpose of a row-major (2 ffn, d) matrix
    down: torch.Tensor  # (ffn, d), likewise
    gate_up_scale: torch.Tensor | None  # (1, 2 ffn) fp32 row-wise weight scales when fp8
    down_scale: torch.Tensor | None


def weights(shape: Shape, device: str) -> tuple[list[Block], torch.Tensor]:
    def bf16(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * 0.02

    def fp8(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = (torch.randn(cols, rows, device=device, dtype=torch.bfloat16) * 8).to(FP8)  # row-major (out, in)
        return w.t(), torch.full((1, cols), 0.02 / 8, device=device)  # column-major (in, out), as _scaled_mm wants

    blocks = []
    qkv_out = (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    for i in range(shape.layers):
        in_fp8 = 0 < i < shape.layers - 1
        gate_up, gate_up_scale = fp8(shape.d, 2 * shape.ffn) if in_fp8 else (bf16(shape.d, 2 * shape.ffn), None)
        down, down_scale = fp8(shape.ffn, shape.d) if in_fp8 else (bf16(shape.ffn, shape.d), None)
        o = bf16(shape.heads * shape.head_dim, shape.d)
        blocks.append(Block(bf16(shape.d, qkv_out), o, gate_up, down, gate_up_scale, down_scale))
    return blocks, bf16(shape.d, shape.vocab)


def linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None) -> torch.Tensor:
    if w_scale is None:
        return x @ w
    x_scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    xq = (x / x_scale).to(FP8)
    if x.device.type == "cpu":  # --dry: no fp8 matmul on the CPU; the same arithmetic, dequantized
        return ((xq.float() * x_scale) @ (w.float() * w_scale)).to(torch.bfloat16)
    return torch._scaled_mm(xq, w, scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)


def step(
    x: torch.Tensor, blocks: list[Block], lm_head: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]], b: int
) -> torch.Tensor:
    """One decode step over `b` sequences (x holds b rows, padded to a multiple of 16 for the fp8 kernels)."""
    head_dim = kv[0][0].shape[-1]
    heads = blocks[0].o.shape[0] // head_dim
    for i, blk in enumerate(blocks):
        h = F.rms_norm(x, (x.shape[1],))
        qkv = h @ blk.qkv
        # One KV head on this GPU: its query heads are one head's queries over the same K and V (b, 1, L, dim).
        q = qkv[:b, : heads * head_dim].view(b, 1, heads, head_dim)
        k, v = kv[i % len(kv)]
        attn = F.scaled_dot_product_attention(q, k, v)  # reads the b sequences' KV
        attn = F.pad(attn.reshape(b, heads * head_dim), (0, 0, 0, x.shape[0] - b))
        x = x + attn @ blk.o
        h = F.rms_norm(x, (x.shape[1],))
        gate, up = linear(h, blk.gate_up, blk.gate_up_scale).chunk(2, dim=1)
        x = x + linear(F.silu(gate) * up, blk.down, blk.down_scale)
    return F.rms_norm(x, (x.shape[1],)) @ lm_head


def measure(shape: Shape, blocks: list[Block], lm_head: torch.Tensor, b: int, context: int, device: str) -> dict:
    rows = max(16, -(-b // 16) * 16)
    x = torch.randn(rows, shape.d, device=device, dtype=torch.bfloat16)
    kv_shape = (b, shape.kv_heads, context, shape.head_dim)
    kv = [
        (
            torch.randn(kv_shape, device=device, dtype=torch.bfloat16),
            torch.randn(kv_shape, device=device, dtype=torch.bfloat16),
        )
        for _ in range(shape.kv_layers)
    ]
    weight_bytes = sum(t.numel() * t.element_size() for blk in blocks for t in (blk.qkv, blk.o, blk.gate_up, blk.down))
    weight_bytes += lm_head.numel() * lm_head.element_size()
    kv_bytes = shape.layers * 2 * b * shape.kv_heads * context * shape.head_dim * 2
    seconds = timed(lambda: step(x, blocks, lm_head, kv, b), device)
    model = (weight_bytes + kv_bytes) / HBM_BYTES_PER_S
    return {
        "batch": b,
        "context": context,
        "weights_gb": weight_bytes / 1e9,
        "kv_gb": kv_bytes / 1e9,
        "step_ms": seconds * 1000,
        "model_ms": model * 1000,
        "achieved_tb_s": (weight_bytes + kv_bytes) / seconds / 1e12 if seconds else 0.0,
        "tok_s": b / seconds if seconds else 0.0,
    }


def timed(fn: Callable[[], object], device: str) -> float:
    """Median seconds of a CUDA-graph replay of `fn` (one untimed call on the CPU)."""
    if device == "cpu":
        fn()
        return 0.0
    for _ in range(2):  # warm-up: kernel selection
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def breakdown(shape: Shape, blocks: list[Block], lm_head: torch.Tensor, b: int, context: int, device: str) -> None:
    """The step's parts timed apart, each over all its layers: where the time goes."""
    rows = max(16, -(-b // 16) * 16)
    x = torch.randn(rows, shape.d, device=device, dtype=torch.bfloat16)
    act = torch.randn(rows, shape.ffn, device=device, dtype=torch.bfloat16)
    attn_in = torch.randn(rows, shape.heads * shape.head_dim, device=device, dtype=torch.bfloat16)
    fp8_blocks = [blk for blk in blocks if blk.gate_up_scale is not None]
    xq, aq = x.to(FP8), act.to(FP8)
    x_scale = torch.ones(rows, 1, device=device)
    kv_shape = (b, shape.kv_heads, context, shape.head_dim)
    kv = [(torch.randn(kv_shape, device=device, dtype=torch.bfloat16),) * 2 for _ in range(shape.kv_layers)]
    q = torch.randn(b, 1, shape.heads, shape.head_dim, device=device, dtype=torch.bfloat16)

    def nbytes(*ts: torch.Tensor) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    one = torch.ones((), device=device)

    def scaled(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None) -> torch.Tensor:
        if device == "cpu":
            return a.float() @ w.float()
        rowwise = w_scale is not None
        a_scale, w_scale = (x_scale, w_scale) if rowwise else (one, one)
        return torch._scaled_mm(a, w, scale_a=a_scale, scale_b=w_scale, out_dtype=torch.bfloat16)

    parts = {
        "qkv + o projections, bf16": (
            lambda: [(x @ blk.qkv, attn_in @ blk.o) for blk in blocks],
            nbytes(*(t for blk in blocks for t in (blk.qkv, blk.o))),
        ),
        "FFN fp8, quantize + scaled_mm": (
            lambda: [
                linear(linear(x, blk.gate_up, blk.gate_up_scale)[:, : shape.ffn], blk.down, blk.down_scale)
                for blk in fp8_blocks
            ],
            nbytes(*(t for blk in fp8_blocks for t in (blk.gate_up, blk.down))),
        ),
        "FFN fp8, scaled_mm alone": (
            lambda: [
                (scaled(xq, blk.gate_up, blk.gate_up_scale), scaled(aq, blk.down, blk.down_scale)) for blk in fp8_blocks
            ],
            nbytes(*(t for blk in fp8_blocks for t in (blk.gate_up, blk.down))),
        ),
        "FFN fp8, scaled_mm alone, one scale per tensor": (
            lambda: [(scaled(xq, blk.gate_up, None), scaled(aq, blk.down, None)) for blk in fp8_blocks],
            nbytes(*(t for blk in fp8_blocks for t in (blk.gate_up, blk.down))),
        ),
        "attention over the KV": (
            lambda: [F.scaled_dot_product_attention(q, *kv[i % len(kv)]) for i in range(shape.layers)],
            shape.layers * 2 * nbytes(kv[0][0]),
        ),
        "LM head, bf16": (lambda: x @ lm_head, nbytes(lm_head)),
    }
    print(f"\nbatch {b}: the parts apart\n\n| part | ms | GB read | achieved TB/s |\n|---|---|---|---|")
    for name, (fn, read) in parts.items():
        seconds = timed(fn, device)
        rate = read / seconds / 1e12 if seconds else 0.0
        print(f"| {name} | {seconds * 1000:.2f} | {read / 1e9:.1f} | {rate:.2f} |", flush=True)


def copy_bandwidth(device: str) -> float:
    """TB/s of a device-to-device copy of 4 GB, bytes read and written counted: what HBM gives in practice."""
    if device == "cpu":
        return 0.0
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 10 * 2 * src.numel() / (start.elapsed_time(end) / 1000) / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--context", type=int, default=4096, help="KV tokens per sequence")
    p.add_argument("--out", type=Path, help="also write the rows here as JSON")
    p.add_argument("--breakdown", type=int, metavar="B", help="also time the step's parts apart at batch B")
    args = p.parse_args()
    shape, device = (TINY, "cpu") if args.dry else (Shape(), "cuda")
    torch.manual_seed(0)
    if device == "cuda":
        copy = copy_bandwidth(device)
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy: {copy:.2f} TB/s", flush=True)
    blocks, lm_head = weights(shape, device)
    rows = []
    print("| batch | KV tokens each | weights GB | KV GB | step ms | model ms (3.35 TB/s) | achieved TB/s | tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for b in (int(x) for x in args.batches.split(",")):
        r = measure(shape, blocks, lm_head, b, args.context, device)
        rows.append(r)
        print(
            f"| {b} | {args.context} | {r['weights_gb']:.1f} | {r['kv_gb']:.2f} | {r['step_ms']:.2f} | "
            f"{r['model_ms']:.2f} | {r['achieved_tb_s']:.2f} | {r['tok_s']:.0f} |",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    if args.breakdown:
        breakdown(shape, blocks, lm_head, args.breakdown, args.context, device)


if __name__ == "__main__":
    main()
