#!/usr/bin/env bash
# Console load benchmark (docs/BENCHMARKS.md): wrk on loopback against an
# authenticated read endpoint (GET /api/datasets with an API token: every
# request is authenticated, authorized and written to the audit log), and
# against a bare axum hello-world in the same run.
# Needs wrk (apt-get install wrk). Usage: bench/console.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-15}"
cargo build --release -j2 -p cloister -p cloister-bench --bin cloister --bin hello-axum
bin=target/release/cloister
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
token=$($bin init "$work/env" 2>&1 | grep -o 'clt_[0-9a-f]*' | head -1)
export CLOISTER_ENV="$work/env" CLOISTER_TOKEN="$token"
sci=$($bin user add sci --role scientist | grep -o 'clt_[0-9a-f]*')
CLOISTER_TOKEN=$sci $bin dataset import spam data/spamassassin/spamassassin.jsonl.gz >/dev/null
$bin serve --addr 127.0.0.1:18080 2>/dev/null &
target/release/hello-axum 127.0.0.1:18081 2>/dev/null &
for port in 18080 18081; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
echo "command: bench/console.sh $secs   (wrk -t2 -c64 -d${secs}s --latency)"
echo
echo "## cloister serve: GET /api/datasets (token auth, policy, durable audit append)"
wrk -t2 -c64 -d"${secs}s" --latency -H "Authorization: Bearer $sci" http://127.0.0.1:18080/api/datasets | tee "$work/console.txt"
echo
echo "## bare axum hello-world"
wrk -t2 -c64 -d"${secs}s" --latency http://127.0.0.1:18081/ | tee "$work/hello.txt"
rps() { awk '/Requests\/sec/ {print $2}' "$1"; }
echo
echo "ratio console/hello: $(python3 -c "print(f'{$(rps "$work/console.txt")/$(rps "$work/hello.txt"):.3f}')")"
kill %1 2>/dev/null || true; sleep 1
echo "audit log after the run: $(CLOISTER_TOKEN=$token $bin audit verify 2>&1 | head -1)"
