#!/usr/bin/env bash
# Training benchmark: Cloister's logreg vs scikit-learn on the same features
# and splits, SpamAssassin (bundled) and 20 Newsgroups (fetched). Needs
# python3 with scikit-learn (pip install scikit-learn).
# Usage: bench/train.sh [REPS]   (each fit REPS times, median time; default 5
# on SpamAssassin, 1 on 20 Newsgroups, where a scikit-learn fit takes minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
cargo build --release -j2 -p cloister-bench --bin train-bench
python3 bench/fetch_20newsgroups.py
out="bench/results/train-bench-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(free -g | awk '/Mem:/{print $2}') GiB RAM"
  echo "rustc: $(rustc --version); $(python3 -c 'import sklearn; print("scikit-learn", sklearn.__version__)')"
  echo
  echo "## SpamAssassin"
  target/release/train-bench --data data/spamassassin/spamassassin.jsonl.gz --out bench/results/spam --reps "${1:-5}"
  python3 bench/sklearn_baseline.py bench/results/spam --reps "${1:-5}" 1 100
  echo
  echo "## 20 Newsgroups"
  target/release/train-bench --data bench/data/20newsgroups-train.jsonl.gz --data bench/data/20newsgroups-test.jsonl.gz --out bench/results/20ng
  python3 bench/sklearn_baseline.py bench/results/20ng 1 100
} | tee "$out"
echo "saved $out"
