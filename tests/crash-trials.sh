#!/usr/bin/env bash
# Runs the kill -9 crash trials N times each (default 200) instead of the
# suite's 12: audit appends and dataset imports.
# Usage: tests/crash-trials.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
CLOISTER_CRASH_TRIALS="${1:-200}" cargo test -j2 -p cloister --test all -- crash:: --test-threads=1
