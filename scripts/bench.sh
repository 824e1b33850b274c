#!/usr/bin/env bash
# Every benchmark (see docs/benchmarks.md), then one table of their figures:
# pgcdc's figure, its baseline from the same run, the ratio (or pgcdc's own
# figure) judged, the target and whether it was met.
# BENCHES="pipeline snapshot" limits the run; the full output is kept in
# target/bench-<name>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pgcdc-target}"
. scripts/rocksdb-env.sh
benches="${BENCHES:-encode pipeline snapshot es_sink verify latency}"
mkdir -p target
for b in $benches; do
  echo "bench.sh: cargo bench --bench $b (release build first; several minutes)" >&2
  cargo bench --bench "$b" 2>&1 | tee "target/bench-$b.log" >&2
done
echo
printf '%-44s | %-58s | %-48s | %7s | %8s | %s\n' figure pgcdc baseline judged target result
for b in $benches; do
  grep '^BENCH' "target/bench-$b.log" || echo "BENCH	$b: no figures (see target/bench-$b.log)	-	-	0	-	NOT met"
done | awk -F'\t' '{printf "%-44s | %-58s | %-48s | %7s | %8s | %s\n", $2, $3, $4, $5, $6, $7}'
