#!/usr/bin/env bash
# pgcdc end to end on this machine, no Docker: a throwaway PostgreSQL cluster,
# a tansu Kafka broker, an OpenSearch-compatible server (osmem-server) and the
# pgcdc daemon running the whole pipeline (PostgreSQL -> Kafka -> search
# index); writes sample rows, prints the change events, a search query that
# shows the rows, the metrics and `pgcdc status`, then cleans everything up.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pgcdc-target}"

bash scripts/install-deps.sh
. scripts/rocksdb-env.sh
bindir="${PG_BINDIR:-$(pg_config --bindir 2>/dev/null || true)}"
[ -x "$bindir/initdb" ] || bindir="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
if [ -x "$CARGO_TARGET_DIR/debug/pgcdc" ]; then
  echo "demo: building pgcdc"
else
  if [ -n "${ROCKSDB_LIB_DIR:-}" ]; then
    echo "demo: building pgcdc for the first time, with the system's RocksDB: librdkafka compiles from C source (about 3 minutes on 2 cores; progress every 30 s)"
  else
    echo "demo: building pgcdc for the first time: RocksDB and librdkafka compile from C/C++ source (about 20 minutes on 2 cores; progress every 30 s)"
  fi
fi
# Cargo prints nothing while a C/C++ library compiles (minutes for RocksDB):
# say every 30 s that the build goes on and what it compiles.
build_log="$(mktemp)"
cargo build --bin pgcdc >"$build_log" 2>&1 &
build_pid=$!
started=$SECONDS
while kill -0 "$build_pid" 2>/dev/null; do
  for _ in $(seq 1 30); do kill -0 "$build_pid" 2>/dev/null && sleep 1; done
  if kill -0 "$build_pid" 2>/dev/null; then
    compiling="$(grep -Eo 'Compiling [^ ]+' "$build_log" | tail -n 3 | cut -d' ' -f2 | paste -sd, -)"
    echo "demo: still building ($(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s; latest: ${compiling:-starting})"
  fi
done
if ! wait "$build_pid"; then
  cat "$build_log"
  exit 1
fi
rm -f "$build_log"
pgcdc="$CARGO_TARGET_DIR/debug/pgcdc"

work="$(mktemp -d /tmp/pgcdc-demo.XXXXXX)"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cleanup() {
  [ -n "${daemon_pid:-}" ] && kill -9 "$daemon_pid" 2>/dev/null || true
  [ -n "${tansu_pid:-}" ] && kill "$tansu_pid" 2>/dev/null || true
  [ -n "${search_pid:-}" ] && kill "$search_pid" 2>/dev/null || true
  as_pg "$bindir/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] && chown postgres "$work"

pg_port="$(free_port)"; kafka_port="$(free_port)"; search_port="$(free_port)"; metrics_port="$(free_port)"
echo "demo: postgresql on 127.0.0.1:$pg_port, kafka (tansu) on 127.0.0.1:$kafka_port, search on 127.0.0.1:$search_port, files in $work"
as_pg "$bindir/initdb" -D "$work/data" -U postgres -A trust --no-sync >/dev/null
cat >> "$work/data/postgresql.conf" <<CONF
port = $pg_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
wal_level = logical
CONF
as_pg "$bindir/pg_ctl" -D "$work/data" -l "$work/postgres.log" -w start >/dev/null
tansu broker --listener-url "tcp://127.0.0.1:$kafka_port" --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
  --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 &
tansu_pid=$!
osmem="$(python3 -c 'import osmem_server; print(osmem_server.resolve_binary())')"
"$osmem" -addr "127.0.0.1:$search_port" -no-stdin-watch -no-ja >"$work/search.log" 2>&1 &
search_pid=$!
search="http://127.0.0.1:$search_port"
for _ in $(seq 1 100); do curl -fsS "$search" >/dev/null 2>&1 && break; sleep 0.1; done

psql() { "$bindir/psql" -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres "$@"; }
psql -c "CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL, email text, created timestamptz DEFAULT now())"

mkdir -p "$work/state"
cat > "$work/pgcdc.toml" <<CONF
state_dir = "$work/state"
[postgres]
host = "127.0.0.1"
port = $pg_port
tables = ["public.users"]
[kafka]
brokers = "127.0.0.1:$kafka_port"
topic_partitions = 1
[elasticsearch]
run_in_daemon = true
url = "$search"
number_of_replicas = 0
flush_interval_ms = 100
[metrics]
listen = "127.0.0.1:$metrics_port"
CONF

"$pgcdc" --config "$work/pgcdc.toml" check
"$pgcdc" --config "$work/pgcdc.toml" run 2>"$work/pgcdc.log" &
daemon_pid=$!
for _ in $(seq 1 100); do
  [ "$(psql -tAc "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgcdc' AND active")" = 1 ] && break
  kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/pgcdc.log"; exit 1; }
  sleep 0.2
done

echo "demo: writing sample rows"
psql <<'SQL'
INSERT INTO users (name, email) VALUES ('ann', 'ann@example.com'), ('bob', 'bob@example.com');
UPDATE users SET email = 'ann@example.org' WHERE name = 'ann';
DELETE FROM users WHERE name = 'bob';
SQL

# Wait until pgcdc has checkpointed past the writes: every event is then acknowledged by Kafka.
target="$(psql -tAc "SELECT pg_current_wal_lsn()")"
for _ in $(seq 1 100); do
  ckpt="$("$pgcdc" --config "$work/pgcdc.toml" status 2>/dev/null | awk '/^checkpoint lsn:/ {print $3}')"
  [ -n "$ckpt" ] && [ "$(psql -tAc "SELECT '$ckpt'::pg_lsn >= '$target'::pg_lsn")" = t ] && break
  sleep 0.2
done
echo "demo: change events on topic cdc-events:"
tansu cat consume cdc-events --broker "tcp://127.0.0.1:$kafka_port" --max-wait-time-ms 3000 | tee "$work/events.json"
count="$(grep -o '"op":"[cud]"' "$work/events.json" | wc -l)"
echo "demo: $count change events (expected 4)"

echo "demo: the mirror index in the search server (the query to try yourself):"
echo "  curl -s '$search/cdc_public_users/_search?q=*&pretty'"
docs=""
for _ in $(seq 1 100); do
  curl -fsS -X POST "$search/cdc_public_users/_refresh" >/dev/null 2>&1 || true
  docs="$(curl -fsS "$search/cdc_public_users/_search?q=*" 2>/dev/null || true)"
  echo "$docs" | grep -q 'ann@example.org' && break
  sleep 0.2
done
echo "$docs"
mirrored="$(echo "$docs" | grep -o '"_id":"[^"]*"' | wc -l)"
echo "demo: $mirrored document(s) in cdc_public_users (expected 1: ann; bob was deleted)"

echo "demo: metrics (curl -s http://127.0.0.1:$metrics_port/metrics):"
curl -fsS "http://127.0.0.1:$metrics_port/metrics" | grep -E '^pgcdc_(events_(in|out)_total|replication_lag_bytes|es_bulk_items_total)' || true
ready="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$metrics_port/ready")"
echo "demo: /ready answers $ready"
echo "demo: pgcdc status:"
"$pgcdc" --config "$work/pgcdc.toml" status
kill -TERM "$daemon_pid"
wait "$daemon_pid" && code=0 || code=$?
daemon_pid=""
echo "demo: pgcdc stopped with exit code $code"
[ "$count" -ge 4 ] && [ "$mirrored" = 1 ] && [ "$ready" = 200 ] && [ "$code" = 0 ] && echo "demo: OK"
