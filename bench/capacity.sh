#!/usr/bin/env bash
# `./kvc bench capacity [ARGS]` and `./kvc bench step [ARGS]` (./kvc passes the build folder
# first): the benchmark with synthetic data calibrated to what the latest `./kvc eval` measured on
# the real models — kvcomp Huffman's bits per value at the default bound, matched at each model's own
# page shape (bench_capacity --check), the least compressible result at the benchmark's shape used —
# unless ARGS give --target-bits or --check. Without an eval, the benchmark's built-in figure is used.
set -euo pipefail
build=$1; shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
name=${KVC_BENCH_NAME:-capacity}
exe=$build/bench/bench_$name
case " $* " in
  *" --target-bits "* | *" --check "*) exec "$exe" "$@" ;;
esac
target=$(python3 "$here/results.py" --eval-target 2>/dev/null || true)
[ -n "$target" ] || exec "$exe" "$@"
first=${target%%$'\n'*}
args=(--target-bits "${first%%$'\t'*}" --target-source "${first#*$'\t'}")
while IFS= read -r check; do
  [ -n "$check" ] && args+=(--check "$check")
done < <(printf '%s\n' "$target" | tail -n +2)
exec "$exe" "${args[@]}" "$@"
