#!/usr/bin/env bash
# `./kvc bench capacity [ARGS]` (./kvc passes the build folder first): bench_capacity with the
# synthetic data calibrated to the bits per value of kvcomp Huffman at the default bound from the
# latest `./kvc eval` kept in bench/results/ (the larger of the models' figures), unless ARGS give
# --target-bits. Without a recorded eval, bench_capacity's built-in figure is used.
set -euo pipefail
build=$1; shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exe=$build/bench/bench_${KVC_BENCH_NAME:-capacity}
case " $* " in
  *" --target-bits "*) exec "$exe" "$@" ;;
esac
target=$(python3 "$here/results.py" --eval-target 2>/dev/null || true)
if [ -n "$target" ]; then
  exec "$exe" --target-bits "${target%%	*}" --target-source "${target#*	}" "$@"
fi
exec "$exe" "$@"
