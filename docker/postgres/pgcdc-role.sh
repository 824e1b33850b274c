#!/usr/bin/env bash
# Runs once, on the first start of an empty data volume, after the schema
# (docker-entrypoint-initdb.d order). Creates the role pgcdc logs in with and
# gives it exactly what it needs: REPLICATION (slot, stream, logical
# messages), SELECT on the captured tables (snapshot and backfill reads) and
# ownership of its publication. CREATE on the database is granted only for
# the ownership transfer and revoked right after.
set -euo pipefail
: "${PGCDC_DB_PASSWORD:?PGCDC_DB_PASSWORD is not set}"
psql -v ON_ERROR_STOP=1 -v pw="$PGCDC_DB_PASSWORD" -v db="$POSTGRES_DB" \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE pgcdc LOGIN REPLICATION PASSWORD :'pw';
GRANT SELECT ON public.customers, public.orders TO pgcdc;
CREATE PUBLICATION pgcdc FOR TABLE public.customers, public.orders;
GRANT CREATE ON DATABASE :"db" TO pgcdc;
ALTER PUBLICATION pgcdc OWNER TO pgcdc;
REVOKE CREATE ON DATABASE :"db" FROM pgcdc;
SQL
