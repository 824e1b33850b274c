#!/usr/bin/env bash
# Throughput benchmark: pgcdc vs pg_recvlogical on a 1M-row backlog (see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pgcdc-target}"
exec cargo bench --bench pipeline
