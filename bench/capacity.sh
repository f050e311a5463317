#!/usr/bin/env bash
# `./kvc bench capacity [ARGS]` (./kvc passes the build folder first): bench_capacity with the
# synthetic data calibrated to the bits per value of kvcomp Huffman at the default bound from the
# latest `./kvc eval` kept in bench/results/ (the larger of the models' figures), and checked at
# each model's own page shape, unless ARGS give --target-bits. Without a recorded eval,
# bench_capacity's built-in figure is used.
set -euo pipefail
build=$1; shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
name=${KVC_BENCH_NAME:-capacity}
exe=$build/bench/bench_$name
case " $* " in
  *" --target-bits "*) exec "$exe" "$@" ;;
esac
target=$(python3 "$here/results.py" --eval-target 2>/dev/null || true)
[ -n "$target" ] || exec "$exe" "$@"
first=${target%%$'\n'*}
args=(--target-bits "${first%%$'\t'*}" --target-source "${first#*$'\t'}")
if [ "$name" = capacity ]; then
  while IFS= read -r check; do
    [ -n "$check" ] && args+=(--check "$check")
  done < <(printf '%s\n' "$target" | tail -n +2)
fi
exec "$exe" "${args[@]}" "$@"
