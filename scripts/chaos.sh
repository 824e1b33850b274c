#!/usr/bin/env bash
# The chaos harness (fault injection on a seeded schedule, see the README):
# builds pgcdc (with failpoints) and the harness, then runs
#   pgcdc-chaos --pgcdc <the pgcdc just built> [args...]
# Every run prints its seed and a `replay:` line; `scripts/chaos.sh --help`
# lists the scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pgcdc-target}"
. scripts/rocksdb-env.sh
if [ -z "${PG_BINDIR:-}" ]; then
  PG_BINDIR="$(pg_config --bindir 2>/dev/null || true)"
  [ -x "$PG_BINDIR/initdb" ] || PG_BINDIR="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  export PG_BINDIR
fi
cargo build --quiet --features failpoints --bin pgcdc
cargo build --quiet -p pgcdc-testkit --bin pgcdc-chaos --bin kafka-mock
bin="$CARGO_TARGET_DIR/debug"
exec "$bin/pgcdc-chaos" --pgcdc "$bin/pgcdc" --kafka-mock "$bin/kafka-mock" "$@"
