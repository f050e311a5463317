#!/usr/bin/env bash
# `./kvc bench attention [--head-dim 64|256] [--quick | --only B CTX [IMPL,...]]`: kvcomp's
# attention kernels, cuBLAS attention and the copy ceiling (gpu_bench_attention;
# gpu_bench_attention_hdN at another head_dim), then torch SDPA on the same shapes
# (attention_torch.py), merged into one table with the speed-up over SDPA. --only: the shape
# (B, CTX) alone (and only the IMPLs named). KVC_BENCH_SUSTAIN_MS=2000 runs each call for about 2 s
# before its timed loop, so that the GPU is at its power cap as under sustained load (compute-bound
# rows read 2-3% slower; gpu_bench_attention.cu). Last line: JSON
#   {"bench":"attention","head_dim":..,"copy_tbps":..,"read_ceiling_tbps":..,"sustain_ms":..,"rows":[{"impl","batch","context","ms","speedup_vs_sdpa",..}]}
set -uo pipefail
dir=${1:?usage: bench/attention.sh BUILD_DIR [--head-dim 64|256] [--quick | --only B CTX [IMPL,...]]}
shift
hd=128
if [ "${1:-}" = --head-dim ]; then
  hd=${2:?--head-dim 64, 128 or 256}
  shift 2
fi
case "$hd" in
  128) suffix= ;;
  64|256) suffix=_hd$hd ;;
  *) echo "attention: --head-dim $hd: 64, 128 or 256" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

exe="$dir/bench/gpu_bench_attention$suffix"
if [ ! -x "$exe" ]; then
  echo "attention: $exe not built (needs a CUDA build)" >&2
  exit 2
fi
"$exe" "$@" | tee "$tmp/kvcomp.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "attention: gpu_bench_attention failed (rc=$rc)" >&2
  exit "$rc"
fi
if command -v python3 >/dev/null; then
  python3 "$here/attention_torch.py" --head-dim "$hd" "$@" | tee "$tmp/torch.log"
else
  echo '{"bench":"attention_torch","error":"no python3","rows":[]}' >"$tmp/torch.log"
fi

python3 - "$tmp/kvcomp.log" "$tmp/torch.log" <<'PY'
import json, sys

def last_json(path):
    for line in reversed(open(path).read().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"rows": []}

k, t = last_json(sys.argv[1]), last_json(sys.argv[2])
hd = k.get("head_dim", 128)
sdpa = {(r["batch"], r["context"]): r["ms"] for r in t.get("rows", []) if "qrows" not in r}
sdpa_q = {(r["batch"], r["context"], r["qrows"]): r["ms"] for r in t.get("rows", [])
          if "qrows" in r}
rows = [dict(r, variant=r.get("variant")) for r in t.get("rows", []) if "qrows" not in r] + \
    k["rows"]
print()
print(f"copy ceiling (read + write): {k.get('copy_tbps', 0):.2f} TB/s; read ceiling (loads "
      f"only): {k.get('read_ceiling_tbps', 0):.2f} TB/s; torch SDPA: "
      f"{'measured' if sdpa else 'not available (' + t.get('error', '?') + ')'}")
print(f"{'impl':<20} {'batch':>6} {'context':>8} {'ms':>9} {'logical TB/s':>13} "
      f"{'read TB/s':>10} {'vs SDPA':>8}")
out = []
plain = [r for r in rows if not r.get("prefix") and r.get("qrows", 1) == 1]
for r in sorted(plain, key=lambda r: (r["context"] * r["batch"], r["batch"], r["impl"])):
    key = (r["batch"], r["context"])
    logical = r["batch"] * r["context"] * 8 * hd * 2 * 2 / (r["ms"] * 1e-3) / 1e12
    sp = sdpa[key] / r["ms"] if key in sdpa else None
    print(f"{r['impl']:<20} {r['batch']:>6} {r['context']:>8} {r['ms']:>9.4f} {logical:>13.2f} "
          f"{r.get('read_tbps', logical):>10.2f} {('%.2fx' % sp) if sp else '-':>8}")
    o = {"impl": r["impl"], "batch": r["batch"], "context": r["context"], "ms": r["ms"],
         "speedup_vs_sdpa": round(sp, 3) if sp else None, "logical_tbps": round(logical, 3)}
    if "read_tbps" in r:
        o["read_tbps"] = r["read_tbps"]
    if "rel_err_vs_fp16" in r:
        o["rel_err_vs_fp16"] = r["rel_err_vs_fp16"]
    out.append(o)
# Batches sharing a prefix: each kvcomp row against the same pool without the cascade.
shared = [r for r in rows if r.get("prefix")]
multi = [r for r in rows if r.get("qrows", 1) > 1]
if shared:
    print()
    print("sequences sharing prefixes, one per group (logical TB/s count a prefix once per sequence):")
    print(f"{'impl':<26} {'batch':>6} {'groups':>6} {'prefix':>7} {'context':>8} {'ms':>9} "
          f"{'logical TB/s':>13} {'vs prefix':>10}")
    key = lambda r: (r["impl"].rsplit("_", 1)[0], r["batch"], r.get("groups", 1), r["prefix"])
    base = {key(r): r["ms"] for r in shared if r["impl"].endswith("_prefix")}
    for r in shared:
        b = base.get(key(r))
        sp = b / r["ms"] if b else None
        print(f"{r['impl']:<26} {r['batch']:>6} {r.get('groups', 1):>6} {r['prefix']:>7} "
              f"{r['context']:>8} {r['ms']:>9.4f} {r['logical_tbps']:>13.2f} "
              f"{('%.2fx' % sp) if sp else '-':>10}")
        out.append({"impl": r["impl"], "batch": r["batch"], "context": r["context"],
                    "prefix": r["prefix"], "groups": r.get("groups", 1), "ms": r["ms"],
                    "speedup_vs_sdpa": None,
                    "speedup_vs_no_cascade": round(sp, 3) if sp else None,
                    "logical_tbps": r["logical_tbps"], "rel_err_vs_prefix": r["rel_err_vs_fp16"]})
# Several query rows per sequence: each kvcomp row against its pool on v2.
if multi:
    print()
    print("several query rows per sequence (speculative tokens, prefill chunks; the launcher "
          "picks v3's tiles of 8 query entries or v2's larger ones), against the same pool on v2 "
          "and torch SDPA with the same rows (unmasked):")
    print(f"{'impl':<22} {'batch':>6} {'context':>8} {'rows':>5} {'entries':>8} {'ms':>9} "
          f"{'vs v2':>7} {'vs SDPA':>8}")
    v2 = {(r["impl"][:-3], r["qrows"]): r["ms"] for r in multi if r["impl"].endswith("_v2")}
    for b, c, q in sorted(sdpa_q):
        print(f"{'torch_sdpa':<22} {b:>6} {c:>8} {q:>5} {q * 4:>8} {sdpa_q[(b, c, q)]:>9.4f}")
        out.append({"impl": "torch_sdpa", "batch": b, "context": c, "qrows": q,
                    "ms": sdpa_q[(b, c, q)], "speedup_vs_sdpa": 1.0})
    for r in multi:
        b = None if r["impl"].endswith("_v2") else v2.get((r["impl"], r["qrows"]))
        sp = b / r["ms"] if b else None
        ref = sdpa_q.get((r["batch"], r["context"], r["qrows"]))
        sq = ref / r["ms"] if ref else None
        print(f"{r['impl']:<22} {r['batch']:>6} {r['context']:>8} {r['qrows']:>5} "
              f"{r['qrows'] * 4:>8} {r['ms']:>9.4f} {('%.2fx' % sp) if sp else '-':>7} "
              f"{('%.2fx' % sq) if sq else '-':>8}")
        out.append({"impl": r["impl"], "batch": r["batch"], "context": r["context"],
                    "qrows": r["qrows"], "ms": r["ms"],
                    "speedup_vs_sdpa": round(sq, 3) if sq else None,
                    "speedup_vs_v2": round(sp, 3) if sp else None,
                    "logical_tbps": r["logical_tbps"], "rel_err_vs_fp16": r["rel_err_vs_fp16"]})
print(json.dumps({"bench": "attention", "head_dim": hd, "copy_tbps": k.get("copy_tbps"),
                  "read_ceiling_tbps": k.get("read_ceiling_tbps"),
                  "sustain_ms": k.get("sustain_ms", 0), "rows": out}))
PY
