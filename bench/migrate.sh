#!/usr/bin/env bash
# `./kvc bench migrate [ARGS]`: bench_migrate with the data calibrated as for `./kvc bench capacity`.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KVC_BENCH_NAME=migrate exec "$here/capacity.sh" "$@"
