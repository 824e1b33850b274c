#!/usr/bin/env bash
# Install what a fresh Debian machine lacks for building, testing and running
# pgcdc's demo: PostgreSQL, the C toolchain pieces the -sys crates need,
# tansu (a Kafka-compatible broker, from crates.io) and osmem-server (an
# OpenSearch-compatible server, from PyPI). Does nothing that is already there.
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

if ! command -v tansu >/dev/null; then
  echo "deps: installing tansu (cargo install; takes a while the first time)"
  cargo install tansu --locked --features dynostore,libsql
fi
if ! python3 -c "import osmem_server" 2>/dev/null; then
  echo "deps: installing osmem-server"
  python3 -m pip install --quiet osmem-server || python3 -m pip install --quiet --break-system-packages osmem-server
fi
