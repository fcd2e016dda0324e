#!/usr/bin/env bash
# Several `cloister serve` replicas over one PostgreSQL environment (issue
# 21): wrk on loopback against GET /api/datasets with an API token (every
# request is authenticated, authorized and durably appended to the one
# audit log) through 1, 2 and 4 serve processes, against one serve on sled
# in the same run. The connections are split evenly over the replicas (one
# wrk per replica, started together); the rate is their sum, the p99 the
# worst replica's. Ends with `audit verify` on the shared log.
# Usage: bench/serves.sh [SECONDS, default 10] [CONNECTIONS, default 16]
# PROFILE=release uses a release build (default: the dev profile, which the
# tests build anyway; say which in the report).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }
secs="${1:-10}"
conns="${2:-16}"
profile="${PROFILE:-dev}"
cargo build -j2 --profile "$profile" -p cloister --bin cloister
dir=debug; [ "$profile" = dev ] || dir="$profile"
cl="$PWD/target/$dir/cloister"
mkdir -p bench/results

. bench/pg_server.sh
pids=()
stop_serves() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
trap 'stop_serves; cleanup' EXIT

# run ENV N: N serves on ports 18100.., N wrk at once; prints one table row.
run() {
  local env="$1" n="$2" label="$3"
  for i in $(seq 0 $((n - 1))); do
    CLOISTER_ENV="$env" "$cl" serve --addr "127.0.0.1:$((18100 + i))" 2>"$work/serve$i.log" &
    pids+=($!)
  done
  for i in $(seq 0 $((n - 1))); do
    for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$((18100 + i))) 2>/dev/null && break; sleep 0.1; done
  done
  local w=()
  for i in $(seq 0 $((n - 1))); do
    wrk -t1 -c$((conns / n)) -d"${secs}s" --latency -H "Authorization: Bearer $4" \
      "http://127.0.0.1:$((18100 + i))/api/datasets" > "$work/wrk$i.txt" &
    w+=($!)
  done
  local failed=0
  for p in "${w[@]}"; do wait "$p" || failed=1; done
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || failed=1; done
  if [ "$failed" = 1 ]; then
    echo "a wrk or a serve process failed ($label):" >&2
    for i in $(seq 0 $((n - 1))); do tail -5 "$work/serve$i.log" "$work/wrk$i.txt" >&2; done
    exit 1
  fi
  stop_serves
  python3 - "$label" "$n" "$work" <<'PY'
import re, sys
label, n, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def ms(v):
    num, unit = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(num) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
rps, p50, p99, errs = 0.0, 0.0, 0.0, 0
for i in range(n):
    t = open(f"{work}/wrk{i}.txt").read()
    rps += float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
    p50 = max(p50, ms(re.search(r"50%\s+(\S+)", t).group(1)))
    p99 = max(p99, ms(re.search(r"99%\s+(\S+)", t).group(1)))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
    errs += int(m.group(1)) if m else 0
print(f"| {label} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {errs} |")
PY
}

# init DIR [STORE]: an environment with a scientist; prints the token.
mkenv() {
  local root sci
  if [ -n "${2:-}" ]; then
    root=$("$cl" init "$1" --store "$2" 2>&1 | grep -o 'clt_[0-9a-f]*' | head -1)
  else
    root=$("$cl" init "$1" 2>&1 | grep -o 'clt_[0-9a-f]*' | head -1)
  fi
  sci=$(CLOISTER_ENV="$1" CLOISTER_TOKEN="$root" "$cl" user add sci --role scientist | grep -o 'clt_[0-9a-f]*')
  echo "$root $sci"
}

out="bench/results/serves-bench-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(free -g | awk '/Mem:/{print $2}') GiB RAM"
  echo "rustc: $(rustc --version); $("$bin/postgres" --version); profile: $profile"
  echo "command: bench/serves.sh $secs $conns   (per replica: wrk -t1 -c$conns/N -d${secs}s --latency)"
  echo
  echo "| serve processes | requests/s | p50 ms (worst replica) | p99 ms (worst replica) | non-2xx |"
  echo "|---|---:|---:|---:|---:|"
  read -r _ sled_sci < <(mkenv "$work/sled")
  run "$work/sled" 1 "sled, 1" "$sled_sci"
  url="$(db)"
  read -r pg_root pg_sci < <(mkenv "$work/pg" "$url")
  for n in 1 2 4; do
    run "$work/pg" "$n" "PostgreSQL, $n" "$pg_sci"
  done
  echo
  echo "shared log: $(CLOISTER_ENV="$work/pg" CLOISTER_TOKEN="$pg_root" "$cl" audit verify 2>&1 | head -1)"
} | tee "$out"
echo "saved $out"
