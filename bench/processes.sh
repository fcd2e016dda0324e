#!/usr/bin/env bash
# Durable audit appends into one PostgreSQL environment from 1, 2 and 4
# processes at once (issue 21: one log, one total order, across processes),
# against one process on sled in the same run. Starts a throwaway
# PostgreSQL server (bench/pg_server.sh) and saves the report under
# bench/results/.
# Usage: bench/processes.sh [appends per run, default 8000] [repetitions, default 2]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
cargo build --release -j2 -p cloister-bench --bin store-bench
n="${1:-8000}"
reps="${2:-2}"

. bench/pg_server.sh

out="bench/results/processes-bench-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(free -g | awk '/Mem:/{print $2}') GiB RAM"
  echo "rustc: $(rustc --version); $("$bin/postgres" --version)"
  echo "command: bench/processes.sh $*"
  for r in $(seq "$reps"); do
    echo; echo "## repetition $r: $n appends per run, 8 threads per process"
    target/release/store-bench processes --store "$(db)" --processes 1,2,4 --appends "$n"
  done
} | tee "$out"
echo "saved $out"
