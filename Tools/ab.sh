#!/usr/bin/env bash
# Tools/ab.sh REV_A REV_B [-n RUNS] [--metric PATH] [--lower-is-better|--higher-is-better] -- COMMAND...
#
# Before/after on a machine that changes speed: builds `iopf` (release) at both revisions
# in worktrees of their own (.build-ab/<commit>, kept, so a second comparison with the same
# revision does not build it again), then runs COMMAND alternately, A B A B ..., RUNS times
# each (default 5), with that revision's `iopf` first on PATH and `$IOPF` naming it. Each
# run gives one number: with --metric, the value at PATH (dots, array indexes as numbers:
# `faultLatencyNs.p50`, `rows.0.seconds`) in the JSON COMMAND prints on standard output;
# without, the run's wall time in seconds. Prints every run, then each side's median and
# the ratio B/A, and which side is better by it.
#
# Example: Tools/ab.sh HEAD~1 HEAD --metric faultLatencyNs.p50 -- \
#            iopf bench --scenario faults --outstanding 1 --seconds 2 --json
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: Tools/ab.sh REV_A REV_B [-n RUNS] [--metric PATH] [--higher-is-better] -- COMMAND..." >&2; exit 2; }
[[ $# -ge 4 ]] || usage
rev_a=$1 rev_b=$2
shift 2
runs=5 metric= better=lower
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    -n) runs=${2:?}; shift 2 ;;
    --metric) metric=${2:?}; shift 2 ;;
    --higher-is-better) better=higher; shift ;;
    --lower-is-better) better=lower; shift ;;
    *) usage ;;
  esac
done
[[ "${1:-}" == "--" ]] || usage
shift
[[ $# -gt 0 && "$runs" =~ ^[1-9][0-9]*$ ]] || usage

# One worktree and one build per commit.
build() {
  local commit dir
  commit=$(git rev-parse --verify "$1^{commit}") || { echo "ab.sh: no revision '$1'" >&2; exit 2; }
  dir=$PWD/.build-ab/$commit
  if [[ ! -x "$dir/.build/release/iopf" ]]; then
    [[ -d "$dir" ]] || git worktree add --detach "$dir" "$commit" >&2
    echo "ab.sh: building $1 ($commit)" >&2
    swift build -c release --product iopf --package-path "$dir" >&2
  fi
  echo "$dir/.build/release"
}
bin_a=$(build "$rev_a")
bin_b=$(build "$rev_b")

# One run: its number on standard output.
measure() {
  local bin=$1 out start end
  shift
  start=$(date +%s.%N)
  out=$(PATH="$bin:$PATH" IOPF="$bin/iopf" "$@")
  end=$(date +%s.%N)
  if [[ -z "$metric" ]]; then
    python3 -c "print($end - $start)"
  else
    python3 -c '
import json, sys
value = json.loads(sys.argv[1])
for key in sys.argv[2].split("."):
    value = value[int(key)] if isinstance(value, list) else value[key]
print(float(value))
' "$out" "$metric"
  fi
}

a=() b=()
for ((i = 1; i <= runs; i++)); do
  a+=("$(measure "$bin_a" "$@")")
  b+=("$(measure "$bin_b" "$@")")
  echo "run $i: A ${a[-1]}  B ${b[-1]}"
done
python3 - "$better" "$rev_a" "$rev_b" "${a[*]}" "${b[*]}" <<'EOF'
import statistics, sys
better, rev_a, rev_b = sys.argv[1:4]
a = [float(x) for x in sys.argv[4].split()]
b = [float(x) for x in sys.argv[5].split()]
ma, mb = statistics.median(a), statistics.median(b)
ratio = mb / ma if ma else float("inf")
print(f"median A ({rev_a}): {ma:.6g}")
print(f"median B ({rev_b}): {mb:.6g}")
winner = "B" if (mb < ma) == (better == "lower") else "A"
print(f"ratio B/A: {ratio:.3f} ({better} is better: {winner} by {abs(ratio - 1) * 100:.1f}%)")
EOF
