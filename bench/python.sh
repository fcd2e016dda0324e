#!/usr/bin/env bash
# The cost of a plugin in Python (issue 22): builds plugins/python/standardize
# with componentize-py and runs python-bench against the Rust standardize.
# Needs `pip install componentize-py==0.25.1`.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp plugins/python/standardize/app.py "$work/"
(cd "$work" && componentize-py -q -d "$OLDPWD/plugin-sdk/wit" -w featurizer \
  componentize --stub-wasi app -o py-standardize.wasm)
cargo build --release -j2 -p cloister-bench --bin python-bench
target/release/python-bench --component "$work/py-standardize.wasm" "$@"
