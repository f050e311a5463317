#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention on dense fp16 KV, the baseline of `./kvc bench attention`.

Same shapes and statistics as bench/gpu_bench_attention.cu: 32 query heads, 8 kv heads, head_dim
128, one query token per sequence; keys with a per-channel offset and scale (one channel in 16 an
outlier), values with a per-channel scale. (The values are drawn by torch's generator, not the C
benchmark's hash: attention's time does not depend on them.) Disjoint input sets rotate so that
repeated calls do not find their K/V in L2. Two formulations are timed and the faster is reported:
  gqa      q [B, 32, 1, 128], k/v [B, 8, ctx, 128], enable_gqa=True
  grouped  q viewed as [B, 8, 4, 128] (the 4 query heads of a kv head as 4 query rows), k/v
           [B, 8, ctx, 128]: plain multi-head SDPA, which every fused backend accepts
Then several query rows per sequence (qrows: 8 sequences of 32k tokens, as the kvcomp bench's
multi-query rows), both formulations again (grouped: q [B, 8, 4 R, 128]), without a causal mask
(the mask covers only the last R x R tokens of 32k; the kvcomp rows apply it).
Median of CUDA-event times after warm-up (and KVC_BENCH_SUSTAIN_MS). Last line:
{"bench":"attention_torch","rows":[...]}.
Usage: attention_torch.py [--head-dim N] [--quick] [--qrows | --only B CTX]   (--qrows: the
multi-query rows alone; --only: the shape (B, CTX) alone, as gpu_bench_attention --only; --head-dim:
64 or 256 instead of 128, over the same bytes, 2^21 x 128 / N tokens, as gpu_bench_attention_hdN)
"""
import json
import os
import statistics
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print(json.dumps({"bench": "attention_torch", "error": "torch not available", "rows": []}))
    sys.exit(0)

HQ, HKV, HD = 32, 8, 128
CONFIGS = [(1, 32768), (8, 32768), (32, 8192), (64, 4096), (16, 131072)]
QROWS = [2, 3, 4, 6, 8, 16, 64, 256]  # as bench/gpu_bench_attention.cu's qrow_counts
MAX_SETS = 64
# KVC_BENCH_SUSTAIN_MS: each timed loop follows about that long of the same calls (the GPU at its
# power cap, as under sustained load; gpu_bench_attention.cu says why).
SUSTAIN_MS = max(0.0, float(os.environ.get("KVC_BENCH_SUSTAIN_MS", "0") or 0))


def model_like_kv(sets, b, ctx, gen):
    """k, v [sets, b, HKV, ctx, HD] fp16 with per-channel statistics."""
    dev = "cuda"
    outlier = torch.rand(HKV, 1, HD, generator=gen, device=dev) < 1 / 16
    off = torch.randn(HKV, 1, HD, generator=gen, device=dev) * torch.where(outlier, 4.0, 0.5)
    ksc = (0.5 + torch.rand(HKV, 1, HD, generator=gen, device=dev)) * torch.where(outlier, 8.0, 1.0)
    vsc = 0.25 + torch.rand(HKV, 1, HD, generator=gen, device=dev)
    k = torch.empty(sets, b, HKV, ctx, HD, dtype=torch.float16, device=dev)
    v = torch.empty_like(k)
    for s in range(sets):  # one set at a time keeps the fp32 temporaries small
        for i in range(b):
            k[s, i] = (off + ksc * torch.randn(HKV, ctx, HD, generator=gen, device=dev)).half()
            v[s, i] = (vsc * torch.randn(HKV, ctx, HD, generator=gen, device=dev)).half()
    return k, v


def median_ms(fn, sets):
    for i in range(3):
        fn(i % sets)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn(0)
    b.record()
    torch.cuda.synchronize()
    once = max(a.elapsed_time(b), 1e-3)
    iters = max(20, min(400, int(300.0 / once)))
    for i in range(int(min(1e6, SUSTAIN_MS / once))):  # as gpu_bench_attention's
        fn(i % sets)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(iters)]
    for i, (s, e) in enumerate(ev):
        s.record()
        fn(i % sets)
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev)


def main():
    global HD
    quick = "--quick" in sys.argv
    if "--head-dim" in sys.argv:
        HD = int(sys.argv[sys.argv.index("--head-dim") + 1])
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "attention_torch", "error": "no CUDA device", "rows": []}))
        return
    total = ((1 << 18) if quick else (1 << 21)) * 128 // HD
    div = 8 if quick else 1
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    rows = []
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print(f"{'impl':<12} {'batch':>6} {'context':>8} {'variant':>8} {'ms':>9} {'TB/s':>7}")
    configs = [] if "--qrows" in sys.argv else CONFIGS
    only = "--only" in sys.argv
    if only:  # as gpu_bench_attention --only B CTX: that shape alone
        i = sys.argv.index("--only")
        configs = [(int(sys.argv[i + 1]), int(sys.argv[i + 2]))]
    for b, ctx in configs:
        ctx //= div
        if b * ctx > total:
            continue
        sets = min(MAX_SETS, total // (b * ctx))
        k, v = model_like_kv(sets, b, ctx, gen)
        q = torch.randn(sets, b, HQ, 1, HD, generator=gen, device="cuda").half()
        best = None
        variants = {
            "gqa": lambda r: F.scaled_dot_product_attention(q[r], k[r], v[r], enable_gqa=True),
            "grouped": lambda r: F.scaled_dot_product_attention(
                q[r].view(b, HKV, HQ // HKV, HD), k[r], v[r]),
        }
        ref = variants["gqa"](0).float().reshape(b, HQ, HD)
        for name, fn in variants.items():
            try:
                out = fn(0).float().reshape(b, HQ, HD)
                err = ((out - ref).norm() / ref.norm()).item()
                ms = median_ms(fn, sets)
            except RuntimeError as e:  # a backend that refuses the shape
                print(f"sdpa {name}: {e}", file=sys.stderr)
                continue
            tbps = b * ctx * HKV * HD * 2 * 2 / (ms * 1e-3) / 1e12
            print(f"{'torch_sdpa':<12} {b:>6} {ctx:>8} {name:>8} {ms:>9.4f} {tbps:>7.2f}"
                  f"  (vs gqa: {err:.1e})")
            if best is None or ms < best[1]:
                best = (name, ms)
        if best:
            rows.append({"impl": "torch_sdpa", "batch": b, "context": ctx, "ms": round(best[1], 5),
                         "variant": best[0]})
        del k, v, q
        torch.cuda.empty_cache()
    b, ctx = 8, 32768 // div
    sets = min(MAX_SETS, total // (b * ctx))
    k, v = model_like_kv(sets, b, ctx, gen) if not only else (None, None)
    for r_rows in [] if only else QROWS:
        q = torch.randn(sets, b, HQ, r_rows, HD, generator=gen, device="cuda").half()
        variants = {
            "gqa": lambda r: F.scaled_dot_product_attention(q[r], k[r], v[r], enable_gqa=True),
            "grouped": lambda r: F.scaled_dot_product_attention(
                q[r].reshape(b, HKV, HQ // HKV * r_rows, HD), k[r], v[r]),
        }
        best = None
        for name, fn in variants.items():
            try:
                ms = median_ms(fn, sets)
            except RuntimeError as e:
                print(f"sdpa {name} rows {r_rows}: {e}", file=sys.stderr)
                continue
            print(f"{'torch_sdpa':<12} {b:>6} {ctx:>8} {name:>8} {ms:>9.4f}  ({r_rows} rows)")
            if best is None or ms < best[1]:
                best = (name, ms)
        if best:
            rows.append({"impl": "torch_sdpa", "batch": b, "context": ctx, "qrows": r_rows,
                         "ms": round(best[1], 5), "variant": best[0]})
        del q
    print(json.dumps({"bench": "attention_torch", "torch": torch.__version__, "head_dim": HD,
                      "rows": rows}))


if __name__ == "__main__":
    main()
