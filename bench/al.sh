#!/usr/bin/env bash
# Label-efficiency benchmark (docs/BENCHMARKS.md): random sampling,
# least-confidence and dual-agree with automatic labels, over three split
# seeds, on the bundled SpamAssassin corpus, through the cloister binary.
# Usage: bench/al.sh [DATA.jsonl.gz] (CLOISTER_BIN picks the binary;
# default: a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-data/spamassassin/spamassassin.jsonl.gz}"
bin="${CLOISTER_BIN:-target/release/cloister}"
if [ -z "${CLOISTER_BIN:-}" ]; then cargo build --release -j2 -p cloister; fi
mkdir -p bench/results
out="bench/results/al-bench-$(basename "$data" .jsonl.gz)-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
  echo "command: bench/al.sh $data (binary $bin)"
  echo
  python3 bench/al_bench.py "$bin" "$data" ${AL_BENCH_ARGS:-}
} | tee "$out"
echo "saved $out"
