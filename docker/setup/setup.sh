#!/usr/bin/env bash
# One-shot provisioning for the docker-compose stack. Runs in the Elasticsearch
# image (it has bash and curl) as two compose services:
#
#   setup.sh elasticsearch   (service setup-elasticsearch, before Kibana and pgcdc)
#     - sets the kibana_system password (POST /_security/user/kibana_system/_password)
#     - creates role pgcdc_writer (cdc_* indices only) and user pgcdc
#     - creates ingest pipeline pgcdc-ingested-at and index template pgcdc-history,
#       so every cdc_*_history document gets `ingested_at` (the time ES indexed it)
#   setup.sh kibana          (service setup-kibana, once Kibana is healthy)
#     - imports /kibana/saved_objects.ndjson (POST /api/saved_objects/_import?overwrite=true)
#     - makes the pgcdc history data view the default one
#
# Idempotent: every request creates or overwrites, so `docker compose up` can run it again.
# Passwords come from the environment and are never printed.
set -euo pipefail

ES_URL=${ES_URL:-http://elasticsearch:9200}
KIBANA_URL=${KIBANA_URL:-http://kibana:5601}
SAVED_OBJECTS=${SAVED_OBJECTS:-/kibana/saved_objects.ndjson}
WAIT_SECS=${WAIT_SECS:-300}

log() { printf 'setup: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# need VAR...: each is set, with at least 6 characters (the shortest password
# Elasticsearch's native realm accepts).
need() {
    local name
    for name in "$@"; do
        [[ -n ${!name:-} ]] || die "$name is not set"
        local value=${!name}
        ((${#value} >= 6)) || die "$name must have at least 6 characters"
    done
}

# JSON string body of a shell value (escapes backslash, double quote and control characters).
json_str() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    s=${s//$'\t'/\\t}
    printf '"%s"' "$s"
}

# es METHOD PATH [BODY]: prints the response body, returns non-zero on a non-2xx status.
es() {
    local method=$1 path=$2 body=${3:-} out code
    out=$(mktemp)
    if [[ -n $body ]]; then
        code=$(curl -sS -o "$out" -w '%{http_code}' -u "elastic:${ELASTIC_PASSWORD}" \
            -X "$method" -H 'Content-Type: application/json' --data-binary @- "${ES_URL}${path}" <<<"$body") || code=000
    else
        code=$(curl -sS -o "$out" -w '%{http_code}' -u "elastic:${ELASTIC_PASSWORD}" \
            -X "$method" "${ES_URL}${path}") || code=000
    fi
    if [[ $code != 2* ]]; then
        log "$method $path -> HTTP $code: $(head -c 2000 "$out")"
        rm -f "$out"
        return 1
    fi
    cat "$out"
    rm -f "$out"
}

wait_for() { # wait_for DESCRIPTION COMMAND...
    local what=$1; shift
    local deadline=$((SECONDS + WAIT_SECS))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what not ready after ${WAIT_SECS}s"
        sleep 3
    done
    log "$what is ready"
}

es_ready() {
    curl -fsS -u "elastic:${ELASTIC_PASSWORD}" "${ES_URL}/_cluster/health?wait_for_status=yellow&timeout=5s"
}

kibana_ready() {
    curl -fsS -u "elastic:${ELASTIC_PASSWORD}" "${KIBANA_URL}/api/status" | grep -Eq '"level" *: *"available"'
}

setup_elasticsearch() {
    need ELASTIC_PASSWORD KIBANA_PASSWORD PGCDC_ES_PASSWORD
    wait_for Elasticsearch es_ready

    log "setting the kibana_system password"
    es POST /_security/user/kibana_system/_password "{\"password\": $(json_str "$KIBANA_PASSWORD")}" >/dev/null

    # What the ES sink does: PUT <index> (create_index), _bulk index/update/delete
    # (write), _delete_by_query?refresh=true for TRUNCATE (read, write, maintenance).
    log "creating role pgcdc_writer and user pgcdc"
    es PUT /_security/role/pgcdc_writer '{
      "cluster": ["monitor"],
      "indices": [{
        "names": ["cdc_*"],
        "privileges": ["create_index", "write", "read", "view_index_metadata", "maintenance"]
      }]
    }' >/dev/null
    es PUT /_security/user/pgcdc "{
      \"password\": $(json_str "$PGCDC_ES_PASSWORD"),
      \"roles\": [\"pgcdc_writer\"],
      \"full_name\": \"pgcdc Elasticsearch sink\"
    }" >/dev/null

    # The history documents carry @timestamp (commit time) and ts_ms (when pgcdc
    # encoded the record); ingested_at adds when Elasticsearch indexed it, so
    # Kibana can chart commit -> searchable latency.
    log "creating ingest pipeline pgcdc-ingested-at and index template pgcdc-history"
    es PUT /_ingest/pipeline/pgcdc-ingested-at '{
      "description": "pgcdc history documents: record when Elasticsearch indexed the change",
      "processors": [{"set": {"field": "ingested_at", "value": "{{{_ingest.timestamp}}}"}}]
    }' >/dev/null
    es PUT /_index_template/pgcdc-history '{
      "index_patterns": ["cdc_*_history"],
      "priority": 200,
      "template": {
        "settings": {"index.default_pipeline": "pgcdc-ingested-at"},
        "mappings": {"properties": {"ingested_at": {"type": "date"}}}
      },
      "_meta": {"description": "pgcdc history indices (docker/setup/setup.sh)"}
    }' >/dev/null
    log "Elasticsearch is set up"
}

setup_kibana() {
    need ELASTIC_PASSWORD
    [[ -r $SAVED_OBJECTS ]] || die "$SAVED_OBJECTS is missing"
    wait_for Kibana kibana_ready

    log "importing $(wc -l <"$SAVED_OBJECTS") saved objects from $SAVED_OBJECTS"
    local out code attempt
    out=$(mktemp)
    # A Kibana that has just turned healthy may still be starting plugins: retry a few times.
    for attempt in 1 2 3 4 5 6 7 8 9 10; do
        code=$(curl -sS -o "$out" -w '%{http_code}' -u "elastic:${ELASTIC_PASSWORD}" \
            -X POST -H 'kbn-xsrf: true' \
            --form "file=@${SAVED_OBJECTS};filename=saved_objects.ndjson" \
            "${KIBANA_URL}/api/saved_objects/_import?overwrite=true") || code=000
        if [[ $code == 200 ]] && grep -Eq '"success" *: *true' "$out"; then
            break
        fi
        log "import attempt $attempt: HTTP $code: $(head -c 2000 "$out")"
        # An answer that lists object errors will not change on retry.
        [[ $code == 200 ]] && die "saved objects import reported errors"
        ((attempt < 10)) || die "saved objects import failed"
        sleep 6
    done
    log "import: $(grep -Eo '"successCount" *: *[0-9]+' "$out")"
    rm -f "$out"

    # Not fatal: older 8.x releases may lack the data views API.
    if curl -fsS -o /dev/null -u "elastic:${ELASTIC_PASSWORD}" -X POST \
        -H 'kbn-xsrf: true' -H 'Content-Type: application/json' \
        -d '{"data_view_id": "pgcdc-history", "force": true}' \
        "${KIBANA_URL}/api/data_views/default"; then
        log "default data view: pgcdc-history"
    else
        log "warning: could not set the default data view (ignored)"
    fi
    log "Kibana is set up: dashboard \"pgcdc: changes\" (id pgcdc-overview)"
}

case ${1:-} in
elasticsearch) setup_elasticsearch ;;
kibana) setup_kibana ;;
*) die "usage: setup.sh elasticsearch|kibana" ;;
esac
