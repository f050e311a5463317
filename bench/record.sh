#!/usr/bin/env bash
# Runs one benchmark command and keeps its JSON line (the last line it prints) with the machine,
# the date and the command, as one JSON line in a new file under bench/results/ (KVC_RESULTS_DIR
# overrides: on the GPU machine, point it at $OUT and copy the file back). `./kvc results` then
# regenerates bench/RESULTS.md from every file there.
#   bench/record.sh bench capacity [ARGS...]     # ./kvc bench capacity [ARGS...]
#   bench/record.sh eval [ARGS...]               # ./kvc eval [ARGS...]
#   bench/record.sh PROGRAM [ARGS...]            # any other command, as given (e.g. a build's
#                                                # bench/capacity.sh BUILD_DIR)
# Exits with the command's status; nothing is kept when the command fails or prints no JSON.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ $# -ge 1 ] || { sed -n '2,11p' "${BASH_SOURCE[0]}" >&2; exit 2; }
case "$1" in
  bench|eval|demo) cmd=("$root/kvc" "$@"); shown="./kvc $*"
                   name=$( [ "$1" = bench ] && [ $# -ge 2 ] && echo "$2" || echo "$1" ) ;;
  *) cmd=("$@"); shown="$*"; name=$(basename "$1"); name=${name#bench_}; name=${name%.sh} ;;
esac
dir=${KVC_RESULTS_DIR:-$root/bench/results}
mkdir -p "$dir"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

set +e
"${cmd[@]}" | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
  echo "record: '$shown' exited with $rc; nothing recorded" >&2
  exit "$rc"
fi

cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c |
       awk '{n=$1; $1=""; sub(/^ /,""); printf "%s%d x %s", (NR>1?", ":""), n, $0}' || true)
machine="${gpus:+$gpus; }$(nproc) cores ${cpu:-unknown CPU}"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out="$dir/$name-$stamp.jsonl"

KVC_MACHINE="$machine" KVC_COMMAND="$shown" KVC_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
python3 - "$log" "$out" <<'PY'
import json, os, sys
lines = [l for l in open(sys.argv[1], encoding="utf-8", errors="replace").read().splitlines() if l.strip()]
try:
    result = json.loads(lines[-1])
except (IndexError, ValueError):
    sys.exit("record: the command's last line is not JSON; nothing recorded")
record = {"machine": os.environ["KVC_MACHINE"], "date": os.environ["KVC_DATE"],
          "command": os.environ["KVC_COMMAND"], "result": result}
with open(sys.argv[2], "a", encoding="utf-8") as f:
    f.write(json.dumps(record, separators=(",", ":")) + "\n")
print("record: kept in " + sys.argv[2], file=sys.stderr)
PY
