#!/usr/bin/env bash
# `./kvc bench step [ARGS]`: bench_step with the data calibrated as for `./kvc bench capacity`.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KVC_BENCH_NAME=step exec "$here/capacity.sh" "$@"
