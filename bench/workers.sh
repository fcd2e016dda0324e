#!/usr/bin/env bash
# Fits on `cloister worker` processes against fits in the process (issue
# 21): `train` (mlp) and an active-learning job on sled, on PostgreSQL, and
# on PostgreSQL with 1 and 2 workers, through the release binary. Starts a
# throwaway PostgreSQL server (bench/pg_server.sh) and saves the report
# under bench/results/.
# Usage: bench/workers.sh [DATA.jsonl.gz, default the bundled SpamAssassin] [repetitions, default 2]
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-data/spamassassin/spamassassin.jsonl.gz}"
reps="${2:-2}"
cargo build --release -j2 -p cloister
mkdir -p bench/results

. bench/pg_server.sh

out="bench/results/workers-bench-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(free -g | awk '/Mem:/{print $2}') GiB RAM"
  echo "rustc: $(rustc --version); $("$bin/postgres" --version)"
  echo "command: bench/workers.sh $*"
  echo
  python3 bench/workers_bench.py target/release/cloister "$data" "$work/sock" "$reps"
} | tee "$out"
echo "saved $out"
