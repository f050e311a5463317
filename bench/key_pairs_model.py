# Model of the bit-pack fast path's key pairs (attention/kvc_attn_v3.cuh: kpair_r, code_pair_k and
# v3_fast_tables' key entries), in exact arithmetic. For every width 1-8 and every pair of head_dim
# 64 and 128 it checks that the operand code_pair_k builds is exactly 1 + u 2^(r - 10) with the
# pair's codes, that the base entries are exact in fp16 for keys' u in [1024, 4096], and that
# sum Q' (operand + base) 2^(e + 10) equals sum Q step (u + b) exactly. The GPU tests check the
# kernel itself; this checks the arithmetic it relies on.
# run: python3 bench/key_pairs_model.py (prints the number of pairs checked, asserts on a mismatch).
import random, numpy as np
from fractions import Fraction as F

def byte_perm(x, y, sel):
    b = [(x >> (8 * i)) & 255 for i in range(4)] + [(y >> (8 * i)) & 255 for i in range(4)]
    return sum(b[(sel >> (4 * k)) & 7] << (8 * k) for k in range(4))

def funnel_l(lo, hi, sh):  # CUDA's __funnelshift_l(lo, hi, sh): the top 32 bits of (hi:lo) << sh
    return (((hi << 32) | lo) << sh >> 32) & 0xffffffff

def kpair_r(W, i1):
    o1 = i1 * W; f1 = o1 & 31
    L1 = (48 if f1 + W > 32 else 32) - f1 - W
    return (L1 & 7) if (L1 & 7) <= 10 - W else 10 - W

def code_pair_k(W, x, y, i1, i2):
    NA = len(x)
    o1, o2 = i1 * W, i2 * W
    q1, f1, q2, f2 = o1 >> 5, o1 & 31, o2 >> 5, o2 & 31
    c1, c2 = f1 + W > 32, f2 + W > 32
    X = funnel_l(x[min(q1 + 1, NA - 1)], x[q1], 16) if c1 else x[q1]
    Y = funnel_l(y[min(q2 + 1, NA - 1)], y[q2], 16) if c2 else y[q2]
    L1 = (48 if c1 else 32) - f1 - W; L2 = (48 if c2 else 32) - f2 - W
    k1, k2, r, re = L1 >> 3, L2 >> 3, L1 & 7, kpair_r(W, i1)
    sel = k1 | (min(k1 + 1, 3) << 4) | ((k2 + 4) << 8) | ((min(k2 + 1, 3) + 4) << 12)
    v = byte_perm(X, Y, sel)
    return (v >> (r - re)) & ((((1 << W) - 1) << re) * 0x10001)

def half(bits):  # fp16 bits -> Fraction (normal numbers only)
    e = (bits >> 10) & 31; m = bits & 1023; sgn = -1 if bits >> 15 else 1
    assert 0 < e < 31
    return sgn * F(1024 + m, 1024) * F(2) ** (e - 15)

def exact_f16(fr):  # whether a Fraction is exactly representable as a normal fp16
    v = np.float16(float(fr)); return F(float(v)) == fr

rng = random.Random(5)
checked = 0
for HD in (64, 128):
    NC = HD // 4
    for W in range(1, 9):
        for trial in range(30):
            codes = [rng.randrange(1 << W) for _ in range(NC)]
            # the run, most significant bit first, in NA words (+1 slack word, zero)
            bits = "".join(format(c, "0%db" % W) for c in codes)
            bits += "0" * (-len(bits) % 32 + 32)
            words = [int(bits[32 * i:32 * i + 32], 2) for i in range(len(bits) // 32)]
            NA = (NC * W + 31) // 32
            x = words[:NA]
            for pi in range(HD // 8):
                ch = 16 * (pi // 8) + pi % 8
                r = kpair_r(W, ch)
                v = code_pair_k(W, x, x, ch, ch + 8) | 0x3C003C00
                lo, hi = v & 0xffff, v >> 16
                assert half(lo) == 1 + F(codes[ch]) * F(2) ** (r - 10), (HD, W, pi)
                assert half(hi) == 1 + F(codes[ch + 8]) * F(2) ** (r - 10), (HD, W, pi)
                # tables: base entry for u in [1024, 4096]
                for u in (1024, 1025, 2047, 2048, 2049, 4095, 4096, rng.randrange(1024, 4097)):
                    b = u + (1 << W) - 2048
                    bm = F(2) ** (r - 10); bo = F((1 << W) - 2048 - (1024 >> r)) * bm
                    ent = u * bm + bo
                    assert ent == F(b) * F(2) ** (r - 10) - 1
                    assert exact_f16(ent) or ent == 0, (W, r, u, ent)
                    # the identity: Q^op (op + ent) 2^(e + 10) = Q step (code + b), with Q^op = Q step 2^-e 2^-r
                    q, step, e = F(rng.randrange(-999, 999), 256), F(3, 64), 3
                    qop = q * step * F(2) ** (-e - r)
                    op = 1 + F(codes[ch]) * F(2) ** (r - 10)
                    assert qop * (op + ent) * F(2) ** (e + 10) == q * step * (codes[ch] + b)
                checked += 1
print("pairs checked:", checked)
