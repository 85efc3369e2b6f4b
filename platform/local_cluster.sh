#!/usr/bin/env bash
# A local Ray cluster with token authentication on and the dashboard on 127.0.0.1.
#
#   platform/local_cluster.sh up       start a head node (what `make cluster-up` runs)
#   platform/local_cluster.sh worker   add a worker node to it (RESOURCES='{"trainer": 2}' etc.)
#   platform/local_cluster.sh down     stop the nodes this script started (and nothing else)
#   platform/local_cluster.sh status   are they running; where is the dashboard
#   platform/local_cluster.sh env      shell exports for `ray job submit` against it (no secret in them)
#   platform/local_cluster.sh token    create the token file if missing and make it private (prints the path)
#
# Settings (environment or `make cluster-up VAR=value`):
#   RAY_AUTH_TOKEN        the token itself; else RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token), a
#                         file created with mode 0600 when missing. The token is never printed or logged.
#   RAY_AUTH_MODE         token (default) | disabled (refused unless the dashboard stays on loopback)
#   DASHBOARD_HOST        127.0.0.1 (default); anything else exposes the Jobs API beyond this machine
#   RAY_PORT (6379)  DASHBOARD_PORT (8265)  METRICS_EXPORT_PORT (8080)  NUM_CPUS  NUM_GPUS  RESOURCES
#   OBJECT_STORE_MEMORY (bytes)  RAY_TEMP_DIR (Ray's --temp-dir)  CLUSTER_DIR (pid and log files)
#   DASHBOARD_AGENT_LISTEN_PORT  DASHBOARD_AGENT_GRPC_PORT  RUNTIME_ENV_AGENT_PORT  RAY_CLIENT_SERVER_PORT
#   NODE_NAME (worker pid/log file name, default worker-1)  RAY_HEAD_ADDRESS (worker: default 127.0.0.1:RAY_PORT)
#
# Nodes run as `ray start --block` in their own session, so `down` stops exactly those process groups
# (never `ray stop`, which kills every Ray process on the machine, other users' included).
set -euo pipefail

RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_HOST=${DASHBOARD_HOST:-127.0.0.1}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
METRICS_EXPORT_PORT=${METRICS_EXPORT_PORT:-8080}
CLUSTER_DIR=${CLUSTER_DIR:-${TMPDIR:-/tmp}/rayalign-cluster-$RAY_PORT}
RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
NODE_NAME=${NODE_NAME:-worker-1}
START_TIMEOUT_S=${START_TIMEOUT_S:-120}

log() { echo "[cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

is_loopback() { [[ "$1" == 127.* || "$1" == "localhost" || "$1" == "::1" ]]; }

token_file() { echo "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"; }

prepare_token() {
    # Exports what every Ray process (and `ray job submit`) needs, without ever echoing the token.
    case "$RAY_AUTH_MODE" in
        token) ;;
        disabled)
            if ! is_loopback "$DASHBOARD_HOST" && [[ "${ALLOW_INSECURE:-0}" != 1 ]]; then
                die "RAY_AUTH_MODE=disabled with DASHBOARD_HOST=$DASHBOARD_HOST would let anyone who can reach" \
                    "port $DASHBOARD_PORT run code on this machine (CVE-2023-48022); set ALLOW_INSECURE=1 to insist"
            fi
            log "WARNING: token authentication disabled (RAY_AUTH_MODE=disabled)"
            export RAY_AUTH_MODE
            return ;;
        *) die "RAY_AUTH_MODE must be token or disabled, got '$RAY_AUTH_MODE'" ;;
    esac
    export RAY_AUTH_MODE=token
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        export RAY_AUTH_TOKEN
        return
    fi
    local path
    path=$(token_file)
    if [[ ! -s "$path" ]]; then
        ( umask 077
          mkdir -p "$(dirname "$path")"
          od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$path" )
        log "created a new token file $path (mode 0600)"
    fi
    if [[ -n "$(find "$path" -maxdepth 0 -perm /077 2>/dev/null)" ]]; then
        [[ -O "$path" ]] || die "$path is readable by others and not yours to fix"
        chmod 600 "$path"
        log "restricted $path to mode 0600 (it was readable by other users)"
    fi
    export RAY_AUTH_TOKEN_PATH="$path"
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

optional_args() {
    local -n out=$1
    [[ -n "${NUM_CPUS:-}" ]] && out+=(--num-cpus "$NUM_CPUS")
    [[ -n "${NUM_GPUS:-}" ]] && out+=(--num-gpus "$NUM_GPUS")
    [[ -n "${RESOURCES:-}" ]] && out+=(--resources "$RESOURCES")
    [[ -n "${OBJECT_STORE_MEMORY:-}" ]] && out+=(--object-store-memory "$OBJECT_STORE_MEMORY")
    [[ -n "${RAY_TEMP_DIR:-}" ]] && out+=(--temp-dir "$RAY_TEMP_DIR")
    [[ -n "${DASHBOARD_AGENT_LISTEN_PORT:-}" ]] && out+=(--dashboard-agent-listen-port "$DASHBOARD_AGENT_LISTEN_PORT")
    [[ -n "${DASHBOARD_AGENT_GRPC_PORT:-}" ]] && out+=(--dashboard-agent-grpc-port "$DASHBOARD_AGENT_GRPC_PORT")
    [[ -n "${RUNTIME_ENV_AGENT_PORT:-}" ]] && out+=(--runtime-env-agent-port "$RUNTIME_ENV_AGENT_PORT")
    return 0
}

launch() {  # launch NAME ray-start-args...: `ray start --block` in a new session, pid in CLUSTER_DIR/NAME.pid
    local name=$1; shift
    local pidfile="$CLUSTER_DIR/$name.pid" logfile="$CLUSTER_DIR/$name.log"
    alive "$pidfile" && die "$name already running (pid $(cat "$pidfile")); run '$0 down' first"
    command -v ray >/dev/null || die "'ray' not on PATH (activate the venv or run through make)"
    mkdir -p "$CLUSTER_DIR"
    chmod 700 "$CLUSTER_DIR"
    local starter=()
    command -v setsid >/dev/null && starter=(setsid)
    nohup "${starter[@]}" ray start --block --disable-usage-stats "$@" >"$logfile" 2>&1 </dev/null &
    echo $! >"$pidfile"
}

wait_for() {  # wait_for NAME CHECK...: until CHECK succeeds, the node dies, or the timeout passes
    local name=$1; shift
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until "$@" >/dev/null 2>&1; do
        alive "$CLUSTER_DIR/$name.pid" || { tail -n 30 "$CLUSTER_DIR/$name.log" >&2; die "$name exited during start"; }
        ((SECONDS < deadline)) || die "$name not ready after ${START_TIMEOUT_S}s (log: $CLUSTER_DIR/$name.log)"
        sleep 1
    done
}

dashboard_url() {
    local host=$DASHBOARD_HOST
    [[ "$host" == 0.0.0.0 || "$host" == "::" ]] && host=127.0.0.1
    echo "http://$host:$DASHBOARD_PORT"
}

auth_header() {  # on stdout, for `curl -H @-`: the token never appears in a command line
    [[ "$RAY_AUTH_MODE" == token ]] || return 0
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        printf 'Authorization: Bearer %s\n' "$RAY_AUTH_TOKEN"
    else
        printf 'Authorization: Bearer %s\n' "$(tr -d ' \n' <"$RAY_AUTH_TOKEN_PATH")"
    fi
}

# /api/version needs the token, so a 200 also proves the server accepts ours.
dashboard_up() { auth_header | curl -fsS -o /dev/null -H @- "$(dashboard_url)/api/version"; }

node_joined() { grep -q "Ray runtime started" "$CLUSTER_DIR/$1.log"; }

cmd_up() {
    prepare_token
    is_loopback "$DASHBOARD_HOST" || log "WARNING: dashboard and Jobs API bound to $DASHBOARD_HOST (reachable from the network)"
    # No --node-ip-address: Ray 2.60 rewrites 127.0.0.1 to the machine's routable address anyway, so
    # the GCS and raylet ports are reachable beyond loopback and the token is what guards them.
    local args=(--head --port "$RAY_PORT" --dashboard-host "$DASHBOARD_HOST"
                --dashboard-port "$DASHBOARD_PORT" --metrics-export-port "$METRICS_EXPORT_PORT")
    [[ -n "${RAY_CLIENT_SERVER_PORT:-}" ]] && args+=(--ray-client-server-port "$RAY_CLIENT_SERVER_PORT")
    optional_args args
    launch head "${args[@]}"
    wait_for head dashboard_up
    log "head up: dashboard $(dashboard_url), GCS 127.0.0.1:$RAY_PORT, metrics :$METRICS_EXPORT_PORT/metrics"
    if [[ "$RAY_AUTH_MODE" == token && -n "${RAY_AUTH_TOKEN:-}" ]]; then
        log "token auth on; token from the RAY_AUTH_TOKEN variable"
    elif [[ "$RAY_AUTH_MODE" == token ]]; then
        log "token auth on; token in $(token_file)"
    fi
    log "submit jobs with:  eval \"\$($0 env)\"; ray job submit --working-dir . --runtime-env platform/runtime_env.yaml -- python -m jobs.dpo --preset dpo_tiny"
}

cmd_worker() {
    prepare_token
    local args=(--address "${RAY_HEAD_ADDRESS:-127.0.0.1:$RAY_PORT}")
    [[ -n "${METRICS_EXPORT_PORT_WORKER:-}" ]] && args+=(--metrics-export-port "$METRICS_EXPORT_PORT_WORKER")
    optional_args args
    launch "$NODE_NAME" "${args[@]}"
    wait_for "$NODE_NAME" node_joined "$NODE_NAME"
    log "$NODE_NAME joined ${RAY_HEAD_ADDRESS:-127.0.0.1:$RAY_PORT}${RESOURCES:+ with resources $RESOURCES}"
}

stop_node() {  # SIGTERM lets `ray start --block` drain and stop its children; then the whole group goes
    local pidfile=$1 pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 45); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
    # Leftovers of this node only: its process group (the node was started as a session leader).
    if [[ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" == "$pid" ]] || pgrep -g "$pid" >/dev/null 2>&1; then
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    log "stopped $(basename "$pidfile" .pid) (pid $pid)"
}

cmd_down() {
    [[ -d "$CLUSTER_DIR" ]] || { log "nothing to stop in $CLUSTER_DIR"; return 0; }
    local pidfile found=0
    for pidfile in "$CLUSTER_DIR"/*.pid; do  # workers first, the head last
        [[ -e "$pidfile" && "$(basename "$pidfile")" != head.pid ]] || continue
        stop_node "$pidfile"; found=1
    done
    [[ -e "$CLUSTER_DIR/head.pid" ]] && { stop_node "$CLUSTER_DIR/head.pid"; found=1; }
    ((found)) || log "nothing to stop in $CLUSTER_DIR"
}

cmd_status() {
    local pidfile any=0
    for pidfile in "$CLUSTER_DIR"/*.pid; do
        [[ -e "$pidfile" ]] || continue
        any=1
        if alive "$pidfile"; then
            log "$(basename "$pidfile" .pid): running (pid $(cat "$pidfile"))"
        else
            log "$(basename "$pidfile" .pid): not running (stale pid file)"
        fi
    done
    ((any)) || { log "no nodes started from $CLUSTER_DIR"; return 1; }
    [[ -n "${RAY_AUTH_TOKEN:-}" ]] || RAY_AUTH_TOKEN_PATH=$(token_file)
    dashboard_up && log "dashboard: $(dashboard_url)" || log "dashboard: not answering at $(dashboard_url)"
}

cmd_env() {
    echo "export RAY_API_SERVER_ADDRESS=$(dashboard_url)"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
        echo "export RAY_AUTH_TOKEN_PATH=$(token_file)"
    fi
}

cmd_token() {
    [[ "$RAY_AUTH_MODE" == token ]] || die "RAY_AUTH_MODE is $RAY_AUTH_MODE"
    [[ -z "${RAY_AUTH_TOKEN:-}" ]] || die "RAY_AUTH_TOKEN is set; no file is used"
    prepare_token
    echo "$RAY_AUTH_TOKEN_PATH"
}

case "${1:-}" in
    up) cmd_up ;;
    worker) cmd_worker ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    token) cmd_token ;;
    *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
