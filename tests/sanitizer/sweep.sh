#!/bin/bash
# Runs the GPU test binaries of a CUDA build under compute-sanitizer (on the GPU machine):
#   tests/sanitizer/sweep.sh BUILD_DIR [TOOL...]      (tools: memcheck racecheck synccheck)
# Environment: KVC_TEST_SCALE (default 0.05) shrinks the cases; KVC_SANITIZER_TIMEOUT (seconds)
# bounds each run; KVC_SANITIZER_TESTS names the binaries (default every gpu_test_*);
# KVC_SANITIZER_LOGS is where the logs go (default a temporary folder); gpu_test_attn and
# gpu_test_cache take KVC_TEST_FILTER (a cmocka pattern of test names). The tests see the tool
# in KVC_SANITIZER_TOOL (gpu_test_attn's many_sequences runs under memcheck alone).
# Prints, per binary and tool, the exit status (99: the sanitizer reported), the sanitizer's
# summary and the tests its reports fall in; exits 1 if any run failed. One report is known and
# not a race: racecheck's hazards in gpu_test_attn's huffman_damage_gives_nan
# (racecheck_named_barriers.cu, beside this script).
set -u
build=${1:?usage: sweep.sh BUILD_DIR [TOOL...]}
shift
tools=${*:-memcheck racecheck synccheck}
logs=${KVC_SANITIZER_LOGS:-$(mktemp -d)}
mkdir -p "$logs"
export KVC_TEST_SCALE=${KVC_TEST_SCALE:-0.05}
# as ctest runs the tests: the source tree, and the models beside the checkout
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export KVC_SOURCE_DIR=${KVC_SOURCE_DIR:-$root}
export KVC_SHARED_DIR=${KVC_SHARED_DIR:-$(cd "$root/.." && pwd)/shared}
limit=${KVC_SANITIZER_TIMEOUT:-0}
status=0
if [ -n "${KVC_SANITIZER_TESTS:-}" ]; then
  bins=(); for n in $KVC_SANITIZER_TESTS; do bins+=("$build/tests/$n"); done
else
  bins=("$build"/tests/gpu_test_*)
fi
for bin in "${bins[@]}"; do
  name=$(basename "$bin")
  for tool in $tools; do
    log=$logs/${name}_$tool.txt
    start=$(date +%s)
    (cd "$(dirname "$bin")" && export KVC_SANITIZER_TOOL=$tool &&
      timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 99 "./$name" > "$log" 2>&1)
    rc=$?
    [ $rc -ne 0 ] && status=1
    summary=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$log" | tail -1 | sed 's/^========= //')
    # the tests that were running when the sanitizer reported
    where=$(awk '/^\[ RUN/ {t = $NF}
                 /^========= [A-Z]/ && !/SUMMARY|COMPUTE-SANITIZER|Target application/ {n[t]++}
                 END {for (t in n) printf "%s %s; ", t, n[t]}' "$log")
    printf '%-20s %-10s rc=%d %4ds  %s  %s\n' "$name" "$tool" $rc $(( $(date +%s) - start )) \
      "$summary" "${where:+in: $where}"
  done
done
echo "logs: $logs"
exit $status
