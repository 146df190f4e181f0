#!/usr/bin/env bash
# The soak (issue: hours of real-looking traffic, nothing lost, nothing
# growing): `eventgate-bench soak` starts its own gateways and runs churn,
# bursts, live settings changes, flapping webhook receivers and faults, then
# writes summary.md, summary.json, timeseries.csv and plot.png.
#
#   bash bench/soak.sh                 # 30 minutes, one node on SQLite
#   NODES=2 bash bench/soak.sh         # two nodes on PostgreSQL + NATS (NATS and PostgreSQL are restarted!)
#   MINUTES=5 bash bench/soak.sh
#
# Env: MINUTES (30), NODES (1), OUT (bench/results/soak-<date>-<nodes>n),
# PROFILE (release), ARGS (more arguments for the soak mode).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-30}
NODES=${NODES:-1}
PROFILE=${PROFILE:-release}
OUT=${OUT:-bench/results/soak-$(date +%Y%m%d-%H%M%S)-${NODES}n}
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
flag=(); [ "$PROFILE" = release ] && flag=(--release)
cargo build "${flag[@]}" -p eventgate --quiet
cargo build "${flag[@]}" -p eventgate-bench --quiet
python3 -c 'import matplotlib' 2>/dev/null || pip install --quiet matplotlib || echo "(no matplotlib: no plot)"
ulimit -n 20000 2>/dev/null || true
# shellcheck disable=SC2086
exec "$TARGET_DIR/$PROFILE/eventgate-bench" soak --minutes "$MINUTES" --nodes "$NODES" \
    --bin "$TARGET_DIR/$PROFILE/eventgate" --out "$OUT" ${ARGS:-}
