#!/usr/bin/env bash
# One call on the lent GPU machine: CUDA build, GPU tests (plain and under compute-sanitizer),
# then the GPU benchmarks; logs under $OUT (or ./gpu-out), a short table last.
#   source .device/prelude.sh && bench/gpu_session.sh [tests|bench|all] [bench names...]
# KVC_MEMCHECK="gpu_test_attn ..." limits the compute-sanitizer runs; KVC_SKIP_CPU_TESTS=1 skips
# the CPU suite there.
set -uo pipefail
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
what=${1:-all}; shift || true
benches=${*:-codec attention step capacity}
summary=()
note() { summary+=("$1"); }

nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$out/gpu.txt"
t0=$(date +%s)
if cmake -S . -B build-gpu -G Ninja -DKVC_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a \
     -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$out/configure.log" 2>&1 &&
   cmake --build build-gpu -j "$(nproc)" -- -k 0 >"$out/build.log" 2>&1; then
  note "build: ok ($(( $(date +%s) - t0 )) s)"
else
  note "build: FAILED (see build.log)"; grep -E "FAILED|error" "$out/build.log" | head -n 20
fi

if [ "$what" = tests ] || [ "$what" = all ]; then
  ctest --test-dir build-gpu -L gpu --output-on-failure --timeout 600 >"$out/gpu-tests.log" 2>&1
  note "gpu tests: $(grep -E 'tests passed|tests failed' "$out/gpu-tests.log" | tail -n 1)"
  grep -E "^\s*[0-9]+/[0-9]+ Test" "$out/gpu-tests.log" | sed 's/^/  /' | while read -r l; do echo "$l"; done
  for t in build-gpu/tests/gpu_test_*; do
    [ -x "$t" ] || continue
    n=$(basename "$t")
    case " ${KVC_MEMCHECK:-$n} " in *" $n "*) ;; *) continue ;; esac
    KVC_TEST_SCALE=0.25 timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$t" \
      >"$out/memcheck-$n.log" 2>&1
    note "memcheck $n: rc=$? $(grep -E 'ERROR SUMMARY' "$out/memcheck-$n.log" | tail -n 1)"
  done
  if [ -z "${KVC_SKIP_CPU_TESTS:-}" ]; then
    ctest --test-dir build-gpu -LE gpu --output-on-failure -j 8 >"$out/cpu-tests.log" 2>&1
    note "cpu tests (GPU machine): $(grep -E 'tests passed|tests failed' "$out/cpu-tests.log" | tail -n 1)"
  fi
fi

if [ "$what" = bench ] || [ "$what" = all ]; then
  for b in $benches; do
    timeout 420 ./kvc bench "$b" >"$out/bench-$b.log" 2>&1
    note "bench $b: rc=$? $(tail -n 1 "$out/bench-$b.log" | cut -c1-300)"
  done
fi
echo "==== summary"
printf '%s\n' "${summary[@]}"
