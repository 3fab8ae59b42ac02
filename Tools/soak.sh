#!/usr/bin/env bash
# Tools/soak.sh MINUTES [SEED] — a long stress run that fails if the service grows.
#
# Runs `iopf stress --external` (host churn, 4 device processes, an `iopf host` with two
# devices of its own) for MINUTES, and beside it churns connections: every few seconds a
# short-lived `iopf host` hands over memory under a new name, a device attaches to it,
# both go, and a device with an id nobody provisioned is refused. The service samples
# itself every 10 s (`--sample-every`): RSS, open descriptors, I/O page-table pages,
# mapped pages, mappings, devices, peers, hosts.
#
# Growth is judged after the first minute (warm-up): the median of the first six samples
# after it against the median of the last six. It fails when RSS grew by more than
# 10% + 4 MiB, descriptors by more than 16, or table pages by more than 10% + 32 (the
# churn's hosts come and go, so single samples move); and when stress found a violation.
# Prints every sample, then the verdict. Needs MINUTES >= 3.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:?usage: Tools/soak.sh MINUTES [SEED]}
seed=${2:-11}
[[ "$minutes" =~ ^[0-9]+$ && "$minutes" -ge 3 ]] || { echo "soak.sh: MINUTES must be a whole number >= 3" >&2; exit 2; }
swift build -c release --product iopf >&2
iopf=$PWD/.build/release/iopf
work=$(mktemp -d)
stress_pid=
cleanup() {
  [[ -n "$stress_pid" ]] && kill "$stress_pid" 2>/dev/null || true
  jobs -p | xargs -r kill 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$iopf" stress --seconds $((minutes * 60)) --external --devices 4 --host-churn --seed "$seed" \
  --sample-every 10 >"$work/stress.out" 2>"$work/stress.err" &
stress_pid=$!
socket=/tmp/iopf-stress-$stress_pid.sock
for _ in $(seq 300); do [[ -S $socket ]] && break; sleep 0.1; done
[[ -S $socket ]] || { cat "$work/stress.err" >&2; echo "soak: the stress service never listened" >&2; exit 1; }

# Connection and host churn, until stress ends.
churned=0
while kill -0 "$stress_pid" 2>/dev/null; do
  name=soak-$churned
  "$iopf" host --connect "$socket" --name "$name" --memory 4M --mappings 1 --churn 5 --seconds 3 \
    --seed "$churned" >/dev/null 2>>"$work/churn.err" &
  host_pid=$!
  sleep 0.5
  "$iopf" device --connect "$socket" --address-space "$name" --device-id 1 --duration 2 \
    --seed "$churned" >/dev/null 2>>"$work/churn.err" || true
  "$iopf" device --connect "$socket" --device-id 999 --duration 1 >/dev/null 2>&1 || true
  wait "$host_pid" || echo "soak: churn host $name exited with status $?" >>"$work/churn.err"
  churned=$((churned + 1))
done
status=0
wait "$stress_pid" || status=$?
stress_pid=

grep -v '^{"elapsed"' "$work/stress.out" || true
# One sample per line, as "name value" pairs: elapsed rssBytes fds tablePages ...
flatten() { awk '{ n = split($0, kv, /[{},]/); line = ""
  for (i = 1; i <= n; i++) { if (split(kv[i], p, ":") == 2 && p[2] != "") { gsub(/"/, "", p[1]); line = line p[1] " " p[2] " " } }
  print line }'; }
grep '^{"elapsed"' "$work/stress.out" | flatten >"$work/samples" || true
column_of() { awk -v k="$1" '{ for (i = 1; i < NF; i += 2) if ($i == k) print $(i + 1) }'; }
awk 'BEGIN { printf "%7s %8s %4s %11s %12s %8s %7s %5s %5s\n", "seconds", "RSS MiB", "fds", "table pages", "mapped pages", "mappings", "devices", "peers", "hosts" }
  { for (i = 1; i < NF; i += 2) v[$i] = $(i + 1)
    printf "%7.0f %8.1f %4d %11d %12d %8d %7d %5d %5d\n", v["elapsed"], v["rssBytes"] / 1048576, v["fds"], v["tablePages"],
      v["mappedPages"], v["mappings"], v["devices"], v["peers"], v["hosts"] }' "$work/samples"

# Samples after the first minute; the median of the first and of the last six.
awk '{ for (i = 1; i < NF; i += 2) if ($i == "elapsed" && $(i + 1) >= 60) print }' "$work/samples" >"$work/after"
n=$(wc -l <"$work/after")
(( n >= 2 )) || { echo "soak: only $n samples after the first minute" >&2; exit 1; }
k=$(( n / 2 < 6 ? n / 2 : 6 ))
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
verdict=0
check() {  # what field relative absolute
  local first last limit
  first=$(head -n "$k" "$work/after" | column_of "$2" | median)
  last=$(tail -n "$k" "$work/after" | column_of "$2" | median)
  limit=$(awk -v f="$first" -v r="$3" -v a="$4" 'BEGIN { printf "%.0f", f * (1 + r) + a }')
  if awk -v l="$last" -v m="$limit" 'BEGIN { exit !(l > m) }'; then
    echo "soak: $1 grew from $first to $last (limit $limit)"
    verdict=1
  else
    echo "soak: $1 $first -> $last (limit $limit): steady"
  fi
}
check "RSS bytes" rssBytes 0.10 4194304
check "descriptors" fds 0 16
check "table pages" tablePages 0.10 32
echo "soak: $churned hosts churned beside the stress run"
if [[ -s "$work/churn.err" ]]; then
  echo "soak: the churn's processes said (first lines):"
  head -5 "$work/churn.err"
fi
if (( status != 0 )); then
  tail -20 "$work/stress.err" >&2
  echo "soak: FAILED: stress exited with status $status" >&2
  exit 1
fi
(( verdict == 0 )) || { echo "soak: FAILED: the service grew" >&2; exit 1; }
echo "soak: passed, $minutes minutes"
