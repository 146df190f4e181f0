#!/bin/bash
# One run of the webhook scenario against a given gateway binary, without
# bench/run.sh's quiet-machine wait: for interleaved A/B sittings of two
# builds (run them in turn, several rounds each, and compare within the
# sitting). Appends the load tool's JSON line to OUT.
#
#   bash bench/webhook-ab.sh <gateway binary> <out.jsonl> <label> [sqlite|postgres]
#
# SECS (10) as in bench/run.sh; PUBLISHERS (4) publishing connections
# (the raw POSTs use as many); the backlog phase queues 10,000 deliveries
# and no SIGKILL restarts are made (bench/run.sh does those). PostgreSQL:
# a fresh database on PG_URL's server, dropped afterwards.
set -u
BIN=$1 OUT=$2 LABEL=$3 BACKEND=${4:-sqlite}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${CARGO_TARGET_DIR:-$ROOT/target}/release/eventgate-bench
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
TOKEN=bench-account-token-0123456789abcdef0123
WORK=$(mktemp -d)
if [ "$BACKEND" = sqlite ]; then
    DB=$WORK/wh.sqlite3
else
    name=eg_wh_$$
    psql -q "$PG_URL" -c "CREATE DATABASE $name" >/dev/null || exit 1
    DB=${PG_URL%/*}/$name
fi
env EVENTGATE_BIND=127.0.0.1:8093 EVENTGATE_DATABASE_URL="$DB" EVENTGATE_ACCOUNT_TOKEN=$TOKEN \
    EVENTGATE_RATE_LIMIT_PER_MINUTE=100000000 EVENTGATE_RATE_LIMIT_INSTANCE_NEW_PER_MINUTE=100000000 \
    EVENTGATE_LOG=warn EVENTGATE_WEBHOOK_ALLOWED_NETWORKS=127.0.0.0/8 EVENTGATE_WEBHOOK_MAX_PENDING=100000000 \
    EVENTGATE_WEBHOOK_RETRY_SCHEDULE_SECS="$(seq -s, 100 | sed 's/[0-9]\+/2/g')" \
    "$BIN" serve >>"$OUT.eventgate.log" 2>&1 &
pid=$!
for _ in $(seq 200); do ss -ltnH "sport = :8093" | grep -q LISTEN && break; sleep 0.05; done
"$BENCH" webhook --url http://127.0.0.1:8093 --secs "${SECS:-10}" --publishers "${PUBLISHERS:-4}" --backlog 10000 --kills 0 \
    --target eventgate --token $TOKEN --server-pid $pid --label "$LABEL" --json >>"$OUT"
kill $pid; wait $pid 2>/dev/null
if [ "$BACKEND" != sqlite ]; then
    psql -q "$PG_URL" -c "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null
fi
rm -rf "$WORK"
