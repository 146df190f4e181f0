#!/usr/bin/env bash
# The benchmark: eventgate against the three reference gateways of
# ../shared/peers (gorilla hub, Node ws, uWebSockets.js), every scenario on a
# freshly started server, all in one run on this machine. Prints the tables of
# BENCHMARKS.md. The load tool is the workspace member bench/eventgate-bench.
#
#   bash bench/run.sh                      # everything (well over 20 minutes)
#   TARGETS="eventgate uws" bash bench/run.sh
#   QUICK=1 bash bench/run.sh              # a short smoke run of every scenario
#   SECS=5 IDLE_CLIENTS=5000 bash bench/run.sh
#
# Env: TARGETS ("eventgate gorilla node uws"), SCENARIOS ("fanout latency
# latency150 idle stalled cluster nodes history storm webhook"), SECS (10), ROUNDS (3: interleaved rounds
# of the latency scenarios and of the stalled pair; the report takes
# medians), IDLE_CLIENTS (19000), CLUSTER (1: also two eventgate nodes on
# PostgreSQL + NATS; and the nodes scenario: 1, 2, 3 nodes of NODE_CLIENTS
# (19000) clients each, NODE_COUNTS ("1 2 3")), FLOOR (1: the latency rounds also measure the floor
# target, `eventgate-bench floor`: one blocking write per client per event and
# nothing else), QUIET_WAIT (90: most seconds to wait before each run for the
# machine to be quiet), QUICK (0; 1 = SECS=3 ROUNDS=1 IDLE_CLIENTS=2000
# CLUSTER=0 QUIET_WAIT=5 unless set, for checking the script, not for
# figures), WEBHOOK_BACKENDS ("sqlite postgres"), PEERS_SRC (../shared/peers beside the repository: the peers'
# sources, read-only), PEERS_DIR (/tmp/eventgate-peers: where they are
# built), OUT (results file), PG_URL, NATS_URL.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ "${QUICK:-0}" = 1 ]; then
    SECS=${SECS:-3} ROUNDS=${ROUNDS:-1} IDLE_CLIENTS=${IDLE_CLIENTS:-2000}
    CLUSTER=${CLUSTER:-0} QUIET_WAIT=${QUIET_WAIT:-5} STORM_CLIENTS=${STORM_CLIENTS:-1000}
    NODE_CLIENTS=${NODE_CLIENTS:-2000}
    WEBHOOK_BACKLOG=${WEBHOOK_BACKLOG:-5000} KILLS=${KILLS:-3}
fi
TARGETS=${TARGETS:-"eventgate gorilla node uws"}
SCENARIOS=${SCENARIOS:-"fanout latency latency150 idle stalled cluster nodes history storm webhook"}
NODE_CLIENTS=${NODE_CLIENTS:-19000}
STORM_CLIENTS=${STORM_CLIENTS:-10000}
WEBHOOK_BACKLOG=${WEBHOOK_BACKLOG:-100000}
KILLS=${KILLS:-20}
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-3}
IDLE_CLIENTS=${IDLE_CLIENTS:-19000}
CLUSTER=${CLUSTER:-1}
QUIET_WAIT=${QUIET_WAIT:-90}
PEERS_SRC=${PEERS_SRC:-$ROOT/../shared/peers}
PEERS_DIR=${PEERS_DIR:-/tmp/eventgate-peers}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
mkdir -p bench/results
OUT=${OUT:-bench/results/run-$(date +%Y%m%d-%H%M%S).jsonl}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BENCH=$TARGET_DIR/release/eventgate-bench
# GATE: the gateway binary measured (another build, for an A/B comparison).
GATE=${GATE:-$TARGET_DIR/release/eventgate}
TOKEN=bench-account-token-0123456789abcdef0123
WORK=$(mktemp -d)

# Two builds: the gateway exactly as `cargo build --release` makes it, then
# the load tool (its own package; its dependencies do not touch the gateway's).
cargo build --release -p eventgate --quiet || exit 1
cargo build --release -p eventgate-bench --quiet || exit 1

build_peers() {
    mkdir -p "$PEERS_DIR"
    if [ "$TARGETS" != eventgate ] && [ ! -d "$PEERS_SRC" ]; then
        echo "no peers at $PEERS_SRC (set PEERS_SRC to the shared/peers folder)"; return 1
    fi
    if [[ " $TARGETS " == *" gorilla "* ]] && [ ! -x "$PEERS_DIR/gorilla-hub/gorilla-hub" ]; then
        command -v go >/dev/null || { apt-get update -qq && apt-get install -y -qq golang-go golang-github-gorilla-websocket-dev; } || return 1
        cp -r "$PEERS_SRC/gorilla-hub" "$PEERS_DIR/" && chmod -R u+w "$PEERS_DIR"
        (cd "$PEERS_DIR" && sh gorilla-hub/build.sh) || return 1
    fi
    if [[ " $TARGETS " == *" node "* ]] && [ ! -d "$PEERS_DIR/node-ws/node_modules/ws" ]; then
        cp -r "$PEERS_SRC/node-ws" "$PEERS_DIR/" && chmod -R u+w "$PEERS_DIR"
        (cd "$PEERS_DIR/node-ws" && npm install --no-audit --no-fund --silent) || return 1
    fi
    # The peers' sources are read-only: install in a copy, like node-ws.
    if [[ " $TARGETS " == *" uws "* ]] && [ ! -d "$PEERS_DIR/uws-hub/node_modules/@trufflesuite/uws-js-unofficial" ]; then
        cp -r "$PEERS_SRC/uws-hub" "$PEERS_DIR/" && chmod -R u+w "$PEERS_DIR"
        (cd "$PEERS_DIR/uws-hub" && npm install --no-audit --no-fund --silent) || return 1
    fi
}
build_peers || { echo "could not build the reference peers"; exit 1; }
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "open-files limit: $(ulimit -n); results -> $OUT"

PIDS=()
SERVER_PID=
PORT=
wait_port() {
    for _ in $(seq 200); do
        ss -ltnH "sport = :$1" | grep -q LISTEN && return 0
        sleep 0.05
    done
    return 1
}
start_eventgate() { # $1 port, $2 database url, rest: extra env
    local port=$1 db=$2; shift 2
    env EVENTGATE_BIND=127.0.0.1:$port EVENTGATE_DATABASE_URL="$db" EVENTGATE_ACCOUNT_TOKEN=$TOKEN \
        EVENTGATE_RATE_LIMIT_PER_MINUTE=100000000 EVENTGATE_RATE_LIMIT_INSTANCE_NEW_PER_MINUTE=100000000 \
        EVENTGATE_LOG=warn "$@" "$GATE" serve >>"$OUT.eventgate.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port"
}
start_server() { # $1 = eventgate|gorilla|node|uws|floor
    PIDS=()
    case $1 in
        eventgate) PORT=8090; rm -f "$WORK/eg.sqlite3"*; start_eventgate 8090 "$WORK/eg.sqlite3" || return 1 ;;
        gorilla) PORT=8081; "$PEERS_DIR/gorilla-hub/gorilla-hub" -addr 127.0.0.1:8081 >>"$OUT.gorilla.log" 2>&1 &
                 PIDS+=($!); wait_port 8081 || return 1 ;;
        floor)   PORT=8083; "$BENCH" floor --url http://127.0.0.1:8083 >>"$OUT.floor.log" 2>&1 &
                 PIDS+=($!); wait_port 8083 || return 1 ;;
        node)    PORT=8082; (cd "$PEERS_DIR/node-ws" && HOST=127.0.0.1 PORT=8082 exec node server.js) >>"$OUT.node.log" 2>&1 &
                 PIDS+=($!); wait_port 8082 || return 1 ;;
        uws)     PORT=8084; (cd "$PEERS_DIR/uws-hub" && HOST=127.0.0.1 PORT=8084 exec node server.js) >>"$OUT.uws.log" 2>&1 &
                 PIDS+=($!); wait_port 8084 || return 1 ;;
    esac
    SERVER_PID=${PIDS[0]}
}
stop_servers() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    done
    PIDS=()
}
trap 'stop_servers; rm -rf "$WORK"' EXIT INT TERM

# Waits (up to QUIET_WAIT s) for a quiet machine: a compile on the two cores distorts results.
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
wait_quiet() {
    local n=0 b0 t0 b1 t1 pct ncpu; ncpu=$(nproc)
    while :; do
        read -r b0 t0 < <(busy); sleep 1; read -r b1 t1 < <(busy)
        pct=$(( 100 * ncpu * (b1 - b0) / (t1 - t0 + 1) ))
        { [ "$pct" -lt 25 ] || [ "$n" -ge "$QUIET_WAIT" ]; } && return 0
        n=$((n + 1))
    done
}

run() { # $1 target, $2 label, $3 time limit, rest: bench args
    local target=$1 label=$2 limit=$3; shift 3
    wait_quiet
    start_server "$target" || { echo "!!! $target did not start"; return; }
    local extra=()
    [ "$target" = eventgate ] && extra=(--token "$TOKEN")
    local cmd=("$BENCH" "$@" --target "$target" --url "http://127.0.0.1:$PORT" --server-pid "$SERVER_PID" --label "$label" --json "${extra[@]}")
    echo "### $target / $label"
    echo "\$ ${cmd[*]}"
    local line
    if line=$(timeout "$limit" "${cmd[@]}"); then echo "$line" >>"$OUT"; else echo "!!! $target/$label failed"; fi
    stop_servers
    sleep 1
}

want() { [[ " $SCENARIOS " == *" $1 "* ]]; }
for target in $TARGETS; do
    want fanout && run "$target" fanout-1x1000 120 fanout --clients 1000 --instances 1 --secs "$SECS"
    want fanout && run "$target" fanout-100x10 120 fanout --clients 1000 --instances 100 --secs "$SECS" --publishers 16
    want idle && run "$target" idle-$IDLE_CLIENTS 240 idle --clients "$IDLE_CLIENTS"
    want stalled || continue
    # A stalled client's effect is a small difference in a tail: alternate
    # the runs with and without it, ROUNDS of each (the report takes medians).
    for r in $(seq "$ROUNDS"); do
        run "$target" fast10-5000-r$r  120 latency --clients 10 --instances 1 --rate 5000 --secs "$SECS"
        run "$target" stalled-5000-r$r 150 stalled --clients 10 --rate 5000 --secs "$SECS"
    done
done

# Latency at a fixed rate is a tail, and tails on a shared machine drift:
# ROUNDS rounds, each over every target in turn, at 50 and at 150 events/s
# (latency under load); the report takes medians. The floor target shows
# what this machine and load tool allow at all.
LATENCY_TARGETS=$TARGETS
[ "${FLOOR:-1}" = 1 ] && LATENCY_TARGETS="$TARGETS floor"
for r in $(seq "$ROUNDS"); do
    for target in $LATENCY_TARGETS; do
        want latency && run "$target" latency-50x1000-r$r 120 latency --clients 1000 --instances 1 --rate 50 --secs "$SECS"
        want latency150 && run "$target" latency-150x1000-r$r 120 latency --clients 1000 --instances 1 --rate 150 --secs "$SECS"
    done
done

# eventgate's own modes against servers started here (not through `run`):
# $1 label, $2 time limit, rest: bench args (the token is added).
run_eventgate() {
    local label=$1 limit=$2; shift 2
    local cmd=("$BENCH" "$@" --target eventgate --token "$TOKEN" --server-pid "${PIDS[0]}" --label "$label" --json)
    echo "### eventgate / $label"; echo "\$ ${cmd[*]}"
    local line
    if line=$(timeout "$limit" "${cmd[@]}"); then echo "$line" >>"$OUT"; else echo "!!! eventgate/$label failed"; fi
}
# A fresh PostgreSQL database for one scenario: prints its URL.
fresh_pg() {
    local db="eg_bench_${1}_$$"
    psql -q "$PG_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
    psql -q "$PG_URL" -c "CREATE DATABASE $db" >/dev/null 2>&1 && echo "${PG_URL%/*}/$db"
}

# History's cost to clients that do not opt in (contract §12): fan-out
# 1 × 1000 at max rate with the history off and with 1000 events kept per
# instance, ROUNDS interleaved rounds (the report takes medians).
if want history && [[ " $TARGETS " == *" eventgate "* ]]; then
    for r in $(seq "$ROUNDS"); do
        for hist in 0 1000; do
            wait_quiet; PIDS=(); rm -f "$WORK/eg.sqlite3"*
            start_eventgate 8090 "$WORK/eg.sqlite3" EVENTGATE_WS_HISTORY_SIZE=$hist &&
                run_eventgate "history$hist-fanout-1x1000-r$r" 120 fanout --clients 1000 --instances 1 \
                    --secs "$SECS" --url http://127.0.0.1:8090
            stop_servers
        done
    done
fi

# Reconnect storms: STORM_CLIENTS clients drop while 100 events are
# published and reconnect, plainly and then recovering; one node, then two
# (every client reconnects to the other node).
if want storm && [[ " $TARGETS " == *" eventgate "* ]]; then
    wait_quiet; PIDS=(); rm -f "$WORK/eg.sqlite3"*
    start_eventgate 8090 "$WORK/eg.sqlite3" EVENTGATE_WS_HISTORY_SIZE=1000 &&
        run_eventgate storm-1node 600 storm --clients "$STORM_CLIENTS" --url http://127.0.0.1:8090
    stop_servers
    if [ "$CLUSTER" = 1 ] && node_url=$(fresh_pg storm); then
        wait_quiet; PIDS=()
        start_eventgate 8091 "$node_url" EVENTGATE_NATS_URL="$NATS_URL" EVENTGATE_WS_HISTORY_SIZE=1000 &&
        start_eventgate 8092 "$node_url" EVENTGATE_NATS_URL="$NATS_URL" EVENTGATE_WS_HISTORY_SIZE=1000 &&
            run_eventgate storm-2nodes 600 storm --clients "$STORM_CLIENTS" --url http://127.0.0.1:8091 \
                --client-urls http://127.0.0.1:8091,http://127.0.0.1:8092
        stop_servers
    fi
fi

# Webhooks on SQLite and on PostgreSQL: raw POST rate, sustained delivery,
# p99 at 20%, publish rate with and without a webhook, a 100,000-delivery
# backlog, and KILLS SIGKILL restarts during a publish stream.
if want webhook && [[ " $TARGETS " == *" eventgate "* ]]; then
    for backend in ${WEBHOOK_BACKENDS:-sqlite postgres}; do
        if [ $backend = sqlite ]; then db="$WORK/wh.sqlite3"; rm -f "$db"*
        else db=$(fresh_pg webhook) || { echo "(no PostgreSQL: webhook run on it skipped)"; continue; }; fi
        wait_quiet; PIDS=()
        # The backlog bound (100,000 by default) is lifted: publishing at full
        # speed for SECS outruns delivery, and deliveries past the bound become
        # dead letters (counted by the tool, not delivered) instead of being measured.
        # Retries every 2 s (100 of them): deliveries that failed while the
        # backlog phase's receiver was down come back soon after it is up.
        hook_env=(EVENTGATE_WEBHOOK_ALLOWED_NETWORKS=127.0.0.0/8 EVENTGATE_WEBHOOK_MAX_PENDING=100000000
                  EVENTGATE_WEBHOOK_RETRY_SCHEDULE_SECS="$(seq -s, 100 | sed 's/[0-9]\+/2/g')")
        start_eventgate 8093 "$db" "${hook_env[@]}" || { stop_servers; continue; }
        # The restart command: SIGKILL the node (its pid is in a file), start it
        # again on the same port and database, return once it listens.
        echo "${PIDS[0]}" >"$WORK/wh.pid"
        cat >"$WORK/restart.sh" <<RESTART
# (the first node is run.sh's child: a zombie until reaped, so wait for its port to close)
kill -9 "\$(cat "$WORK/wh.pid")"; while ss -ltnH "sport = :8093" | grep -q LISTEN; do sleep 0.05; done
env EVENTGATE_BIND=127.0.0.1:8093 EVENTGATE_DATABASE_URL="$db" EVENTGATE_ACCOUNT_TOKEN=$TOKEN \\
    EVENTGATE_RATE_LIMIT_PER_MINUTE=100000000 EVENTGATE_LOG=warn ${hook_env[*]} "$GATE" serve >>"$OUT.eventgate.log" 2>&1 &
echo \$! >"$WORK/wh.pid"
for _ in \$(seq 200); do ss -ltnH "sport = :8093" | grep -q LISTEN && exit 0; sleep 0.05; done; exit 1
RESTART
        run_eventgate webhook-$backend 1500 webhook --url http://127.0.0.1:8093 --secs "$SECS" --publishers 4 \
            --backlog "$WEBHOOK_BACKLOG" --kills "$KILLS" --restart-cmd "bash $WORK/restart.sh"
        PIDS=("$(cat "$WORK/wh.pid")")
        stop_servers
        [ $backend = postgres ] && psql -q "$PG_URL" -c "DROP DATABASE IF EXISTS ${db##*/} WITH (FORCE)" >/dev/null 2>&1
    done
fi

# Two eventgate nodes on one PostgreSQL database and NATS: clients split over
# both, events published on the first.
if [ "$CLUSTER" = 1 ] && want cluster && [[ " $TARGETS " == *" eventgate "* ]]; then
    db="eg_bench_$$"
    if psql -q "$PG_URL" -c "CREATE DATABASE $db" >/dev/null 2>&1; then
        node_url="${PG_URL%/*}/$db"
        wait_quiet
        PIDS=()
        start_eventgate 8091 "$node_url" EVENTGATE_NATS_URL="$NATS_URL" &&
        start_eventgate 8092 "$node_url" EVENTGATE_NATS_URL="$NATS_URL" && {
            sleep 1
            cmd=("$BENCH" fanout --clients 1000 --instances 1 --secs "$SECS" --target eventgate --token "$TOKEN"
                 --url http://127.0.0.1:8091 --client-urls http://127.0.0.1:8091,http://127.0.0.1:8092
                 --server-pid "${PIDS[0]}" --label cluster2-fanout-1x1000 --json)
            echo "### eventgate x2 / cluster2-fanout-1x1000"; echo "\$ ${cmd[*]}"
            line=$(timeout 120 "${cmd[@]}") && echo "$line" >>"$OUT"
        }
        stop_servers
        psql -q "$PG_URL" -c "DROP DATABASE $db WITH (FORCE)" >/dev/null 2>&1
    else
        echo "(no PostgreSQL at $PG_URL: two-node run skipped)"
    fi
fi

# Nodes: 1, 2 and 3 eventgate nodes on one PostgreSQL database and NATS, each
# with NODE_CLIENTS clients of one instance (a process of the load tool per
# node: one process may hold only about 20,000 files here), published at max
# rate on the first node; what is queued at the end is waited for (up to
# 60 s: at max rate, seconds of events queue). Beside the tool's lines: one line per run with the
# bytes the nodes sent to and received from NATS, and the kernel's TCP memory.
nats_bytes() { # sent received: over every open connection to NATS
    ss -tinH 'dport = :4222' | grep -o 'bytes_acked:[0-9]*\|bytes_received:[0-9]*' |
        awk -F: '{s[$1]+=$2} END {print s["bytes_acked"]+0, s["bytes_received"]+0}'
}
if [ "$CLUSTER" = 1 ] && want nodes && [[ " $TARGETS " == *" eventgate "* ]]; then
    for n in ${NODE_COUNTS:-1 2 3}; do
        node_url=$(fresh_pg nodes) || { echo "(no PostgreSQL at $PG_URL: nodes run skipped)"; break; }
        wait_quiet; PIDS=(); ok=1
        for i in $(seq 0 $((n - 1))); do
            start_eventgate $((8095 + i)) "$node_url" EVENTGATE_NATS_URL="$NATS_URL" || ok=0
        done
        if [ $ok = 1 ]; then
            sleep 1
            dir=$(mktemp -d "$WORK/nodes.XXXX"); pids=()
            read -r sent0 recv0 < <(nats_bytes)
            ( peak=0; while sleep 0.5; do m=$(awk '/^TCP:/ {print $NF}' /proc/net/sockstat)
                [ "$m" -gt "$peak" ] && peak=$m && echo "$peak" >"$dir/tcp-mem-pages"; done ) & sampler=$!
            for i in $(seq 0 $((n - 1))); do
                role=(--listeners $((n - 1))); [ "$i" -gt 0 ] && role=(--listen-only)
                cmd=("$BENCH" fanout --clients "$NODE_CLIENTS" --instances 1 --secs "$SECS" --target eventgate
                     --token "$TOKEN" --url "http://127.0.0.1:$((8095 + i))" --server-pid "${PIDS[$i]}"
                     --drain-secs 60 --coordinate "$dir" "${role[@]}" --label "nodes$n-p$i" --json)
                echo "### eventgate x$n / nodes$n-p$i"; echo "\$ ${cmd[*]}"
                timeout 600 "${cmd[@]}" >"$dir/out-$i" & pids+=($!)
            done
            for i in $(seq 0 $((n - 1))); do
                wait "${pids[$i]}" && cat "$dir/out-$i" >>"$OUT" || echo "!!! eventgate/nodes$n-p$i failed"
            done
            kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
            read -r sent1 recv1 < <(nats_bytes)
            echo "{\"target\":\"eventgate\",\"mode\":\"nodes-traffic\",\"label\":\"nodes$n-traffic\",\"nodes\":$n,\"nats_bytes_sent\":$((sent1 - sent0)),\"nats_bytes_received\":$((recv1 - recv0)),\"tcp_mem_pages_peak\":$(cat "$dir/tcp-mem-pages" 2>/dev/null || echo 0)}" >>"$OUT"
        fi
        stop_servers
        psql -q "$PG_URL" -c "DROP DATABASE IF EXISTS ${node_url##*/} WITH (FORCE)" >/dev/null 2>&1
    done
fi

echo
python3 "$ROOT/bench/report.py" "$OUT"
