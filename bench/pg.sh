#!/usr/bin/env bash
# The store and the audit log on PostgreSQL against sled, in the same run
# (issue 21). Starts a throwaway PostgreSQL server (Debian's binaries, fsync
# on, Unix socket only) in a temporary directory, runs store-bench on each
# engine alternately, and saves the report under bench/results/.
# Usage: bench/pg.sh [records per import, default 250000] [repetitions, default 2]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
cargo build --release -j2 -p cloister-bench --bin store-bench
n="${1:-250000}"
reps="${2:-2}"

. bench/pg_server.sh

out="bench/results/pg-bench-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(free -g | awk '/Mem:/{print $2}') GiB RAM"
  echo "rustc: $(rustc --version); $("$bin/postgres" --version)"
  echo "command: bench/pg.sh $*"
  for r in $(seq "$reps"); do
    echo; echo "## repetition $r: import, $n records, sled"
    target/release/store-bench import --records "$n"
    echo; echo "## repetition $r: import, $n records, PostgreSQL"
    target/release/store-bench import --records "$n" --store "$(db)"
    echo; echo "## repetition $r: import, $n records, PostgreSQL + object store (file://)"
    rm -rf "$work/objects"; mkdir -m 700 "$work/objects"
    target/release/store-bench import --records "$n" --store "$(db)" --objects "file://$work/objects"
    echo; echo "## repetition $r: audit appends, sled"
    target/release/store-bench audit --writers 16 --appends 20000
    echo; echo "## repetition $r: audit appends, PostgreSQL"
    target/release/store-bench audit --writers 16 --appends 20000 --store "$(db)"
  done
} | tee "$out"
echo "saved $out"
