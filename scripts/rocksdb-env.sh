# shellcheck shell=bash
# Sourced by the scripts that build pgcdc (demo, CI, benchmarks, chaos).
# Links the system's RocksDB (Debian's librocksdb-dev, 7.8 or newer) instead
# of compiling the copy the rocksdb crate bundles, which is about 15 of the 18
# minutes a first build takes on 2 cores. Nothing changes when ROCKSDB_LIB_DIR
# is already set, when PGCDC_BUNDLED_ROCKSDB=1, or without a usable library.
if [ -z "${ROCKSDB_LIB_DIR:-}" ] && [ -z "${PGCDC_BUNDLED_ROCKSDB:-}" ] && [ -r /usr/include/rocksdb/version.h ]; then
  read -r rocksdb_major rocksdb_minor < <(awk '$2 == "ROCKSDB_MAJOR" {ma = $3} $2 == "ROCKSDB_MINOR" {mi = $3} END {print ma + 0, mi + 0}' /usr/include/rocksdb/version.h)
  rocksdb_so=""
  for f in /usr/lib/*/librocksdb.so /usr/lib/librocksdb.so; do
    if [ -e "$f" ]; then rocksdb_so="$f"; break; fi
  done
  if [ -n "$rocksdb_so" ] && { [ "$rocksdb_major" -gt 7 ] || { [ "$rocksdb_major" -eq 7 ] && [ "$rocksdb_minor" -ge 8 ]; }; }; then
    ROCKSDB_LIB_DIR="$(dirname "$rocksdb_so")"
    export ROCKSDB_LIB_DIR
  fi
  unset rocksdb_major rocksdb_minor rocksdb_so f
fi
