#!/usr/bin/env bash
# Runs the plugin-runtime benchmark in release mode and saves the report.
# Usage: bench/run.sh [plugin-bench flags, e.g. --records 100000 --reps 3]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
cargo build --release -j2 -p cloister-bench
out="bench/results/plugin-bench-$(date -u +%Y%m%dT%H%M%SZ)"
{
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(free -g | awk '/Mem:/{print $2}') GiB RAM"
  echo "rustc: $(rustc --version)"
  echo "command: bench/run.sh $*"
  echo
  target/release/plugin-bench --json "$out.json" "$@"
} | tee "$out.md"
echo "saved $out.md and $out.json"
