#!/usr/bin/env bash
# Runs the store and audit benchmarks in release mode and saves the report.
# Usage: bench/store.sh [records for the big import, default 1000000]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
cargo build --release -j2 -p cloister-bench --bin store-bench
n="${1:-1000000}"
out="bench/results/store-bench-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(free -g | awk '/Mem:/{print $2}') GiB RAM"
  echo "rustc: $(rustc --version)"
  echo "command: bench/store.sh $*"
  for records in $((n / 4)) "$n"; do
    echo
    echo "## import, $records records"
    target/release/store-bench import --records "$records"
  done
  echo
  echo "## audit appends"
  target/release/store-bench audit --writers 16 --appends 20000
} | tee "$out"
echo "saved $out"
