#!/usr/bin/env bash
# ./kvc bench codec [--kv DUMP] [--block-tokens N]: the CPU codec benchmark (bench_codec: bits per
# value and error over bound per codec and bound), then, where a GPU and the CUDA build exist, the
# GPU throughput benchmark (gpu_bench_codec). Prints both, then one JSON line merging their rows
# (each row has "backend": "cpu" or "cuda").
set -euo pipefail
dir=${1:?usage: bench/codec.sh BUILD_DIR [bench_codec args]}
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$dir/bench/bench_codec" "$@" | tee "$tmp/cpu.txt"
if [ -x "$dir/bench/gpu_bench_codec" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$dir/bench/gpu_bench_codec" | tee "$tmp/gpu.txt"
fi
python3 - "$tmp" <<'PY'
import json, os, sys
tmp = sys.argv[1]
rows = []
def last_json(path):
    with open(path) as f:
        lines = [l for l in f.read().splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else {"rows": []}
cpu = last_json(os.path.join(tmp, "cpu.txt"))
for r in cpu["rows"]:
    r["backend"] = "cpu"
    rows.append(r)
gpu_path = os.path.join(tmp, "gpu.txt")
if os.path.exists(gpu_path):
    for r in last_json(gpu_path)["rows"]:
        r["backend"] = "cuda"
        rows.append(r)
print(json.dumps({"bench": "codec", "block_tokens": cpu.get("block_tokens"), "rows": rows},
                 separators=(",", ":")))
PY
