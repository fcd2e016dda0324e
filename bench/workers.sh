#!/usr/bin/env bash
# Plugin stages and fits on `cloister worker` processes against the process (issue
# 21): `train` (mlp) and an active-learning job on sled, on PostgreSQL, and
# on PostgreSQL with 1 and 2 workers, through the release binary. Starts a
# throwaway PostgreSQL server (bench/pg_server.sh) and saves the report
# under bench/results/.
# Usage: bench/workers.sh [DATA.jsonl.gz, default the bundled SpamAssassin] [repetitions, default 2]
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-data/spamassassin/spamassassin.jsonl.gz}"
reps="${2:-2}"
# CLOISTER_BIN=PATH measures that binary instead of building the release
# one (e.g. target/debug/cloister; the report says which).
bin_path="${CLOISTER_BIN:-}"
if [ -z "$bin_path" ]; then
  cargo build --release -j2 -p cloister
  bin_path=target/release/cloister
fi
mkdir -p bench/results

. bench/pg_server.sh

out="bench/results/workers-bench-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(free -g | awk '/Mem:/{print $2}') GiB RAM"
  echo "rustc: $(rustc --version); $("$bin/postgres" --version)"
  echo "command: bench/workers.sh $* (binary: $bin_path)"
  echo
  python3 bench/workers_bench.py "$bin_path" "$data" "$work/sock" "$reps"
} | tee "$out"
echo "saved $out"
