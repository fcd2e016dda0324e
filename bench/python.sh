#!/usr/bin/env bash
# The cost of a plugin in Python (issue 22): builds plugins/python/standardize
# with `cloister plugin build` (componentize-py and the Python SDK) and runs
# python-bench against the Rust standardize.
# Needs `pip install componentize-py==0.25.1`.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build -j2 -p cloister
start=$(date +%s.%N)
target/debug/cloister plugin build plugins/python/standardize --world featurizer \
  -o "$work/py-standardize.wasm"
echo "build: $(echo "$(date +%s.%N) - $start" | bc) s (componentize-py, then the sandbox's inspection)"
cargo build --release -j2 -p cloister-bench --bin python-bench
target/release/python-bench --component "$work/py-standardize.wasm" "$@"
