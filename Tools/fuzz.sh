#!/usr/bin/env bash
# Tools/fuzz.sh — libFuzzer targets over the code that reads another process's bytes.
#   Tools/fuzz.sh --list              the targets, one per line, with what each covers
#   Tools/fuzz.sh TARGET SECONDS [RUNS]
#                                     build (once) with -sanitize=fuzzer,address, run TARGET
#                                     on its seed corpus for SECONDS (or until RUNS
#                                     executions, whichever comes first), print its executions
# Seed corpora: Tools/fuzz/corpus/TARGET (checked in; new inputs found go to a scratch
# copy, not into git). The same corpora are replayed by the test suite (FuzzReplayTests).
set -euo pipefail
cd "$(dirname "$0")/.."
targets=(
  "fault-record|iommufd fault records and page responses: decode, and re-encode what decodes"
  "group-assembly|page-request group assembly from arbitrary record streams: credit, cookies, abandon"
  "message|device/host protocol headers and every payload decoder, with round trips"
  "uffd-events|userfaultfd messages decoded and applied to an engine: its invariants after each"
  "shared-ring|the shared-ring consumer with arbitrary indices, records and closed flag"
)
if [[ "${1:-}" == "--list" ]]; then
  for t in "${targets[@]}"; do printf '%-16s %s\n' "${t%%|*}" "${t#*|}"; done
  exit 0
fi
target=${1:?usage: Tools/fuzz.sh --list | TARGET SECONDS [RUNS]}
seconds=${2:?usage: Tools/fuzz.sh TARGET SECONDS [RUNS]}
runs=${3:--1}
known=no
for t in "${targets[@]}"; do [[ "${t%%|*}" == "$target" ]] && known=yes; done
[[ $known == yes ]] || { echo "fuzz.sh: unknown target '$target' (Tools/fuzz.sh --list)" >&2; exit 2; }
scratch=.build-fuzz
IOPF_FUZZ=1 swift build -c release --product iopf-fuzz --sanitize=fuzzer --sanitize=address \
  --scratch-path "$scratch" >&2
bin="$scratch/release/iopf-fuzz"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "Tools/fuzz/corpus/$target/." "$work/" 2>/dev/null || true
log="$work.log"
started=$SECONDS
set +e
IOPF_FUZZ_TARGET="$target" ASAN_OPTIONS=detect_leaks=0 "$bin" -max_total_time="$seconds" -runs="$runs" -print_final_stats=1 \
  -rss_limit_mb=4096 -max_len=4096 "$work" 2>"$log"
status=$?
set -e
execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
if [[ $status -ne 0 ]]; then
  tail -40 "$log" >&2
  echo "fuzz $target: FAILED after $execs executions (status $status)" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
echo "fuzz $target: $execs executions in $((SECONDS - started)) s, no crash"
