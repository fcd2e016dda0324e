#!/usr/bin/env bash
# The serving benchmark (bench/serve.sh) on an environment whose store is a
# throwaway PostgreSQL database (issue 21): same load, same figures, to
# compare with bench/serve.sh on sled.
# Usage: bench/serve_pg.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/pg_server.sh
CLOISTER_STORE="$(db)" bash bench/serve.sh "$@"
