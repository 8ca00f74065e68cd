#!/usr/bin/env bash
# A local Redis Cluster of three masters on loopback (no replicas), for trying and testing recstack
# against Redis Cluster without Docker.
#
#   infra/redis-cluster.sh start|stop|restart|status|flush
#
# Uses Debian's redis-server (installed when missing) and `redis-cli --cluster create`. Each node
# keeps its configuration, data (AOF, fsync every second), nodes.conf, pid file and log in the
# state directory ($RECSTACK_RUN_DIR, default .run/), so a stopped cluster starts again with its
# data and slot map. `flush` empties every master (tests). recstack reaches the cluster at
# redis+cluster://127.0.0.1:PORT (any node; `start` prints the URL).
# Environment: RECSTACK_REDIS_CLUSTER_PORT (first node's port, 7000; the nodes use PORT..PORT+2),
# RECSTACK_REDIS_CLUSTER_BUS_OFFSET (cluster bus port = node port + this, 10000),
# RECSTACK_REDIS_STOP_TIMEOUT (seconds, 20), RECSTACK_REDIS_CLUSTER_PASSWORD (unset: no password;
# set: every node requires it, clients name it in the URL, e.g. redis+cluster://:PASSWORD@HOST:PORT,
# or in RECSTACK_REDIS_PASSWORD; the node configs holding it are readable by their owner only).
COMPONENT=redis-cluster
# shellcheck source=infra/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BASE_PORT="${RECSTACK_REDIS_CLUSTER_PORT:-7000}"
BUS_OFFSET="${RECSTACK_REDIS_CLUSTER_BUS_OFFSET:-10000}"
NODES=3
STOP_TIMEOUT="${RECSTACK_REDIS_STOP_TIMEOUT:-20}"
STATE_ROOT="$RUN_DIR/redis-cluster"
LOG_FILE="$LOG_DIR/redis-cluster-$BASE_PORT.log" # `redis-cli --cluster create` output
CLUSTER_PASSWORD="${RECSTACK_REDIS_CLUSTER_PASSWORD:-}"

ports() { seq "$BASE_PORT" $((BASE_PORT + NODES - 1)); }
pid_file() { printf '%s/redis-cluster-%s.pid\n' "$RUN_DIR" "$1"; }
node_log() { printf '%s/redis-cluster-%s.log\n' "$LOG_DIR" "$1"; }
node_pid() { pid_from_file "$(pid_file "$1")" "redis-server 127.0.0.1:$1"; }
# redis-cli (and `redis-cli --cluster`) reads the password from REDISCLI_AUTH, off the command line.
auth_cli() {
    if [[ -n $CLUSTER_PASSWORD ]]; then
        REDISCLI_AUTH=$CLUSTER_PASSWORD "$@"
    else
        "$@"
    fi
}
cli() {
    local port=$1
    shift
    auth_cli redis-cli -h 127.0.0.1 -p "$port" "$@"
}

# `status` (via report_status) asks for running_pid: the cluster counts as running when every node is.
running_pid() {
    local port pids=()
    for port in $(ports); do
        pids+=("$(node_pid "$port")") || return 1
    done
    printf '%s\n' "${pids[*]}"
}

install_redis() {
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
    apt_install redis-server redis-tools
}

write_config() {
    local port=$1 dir="$STATE_ROOT/$1"
    mkdir -p "$dir" "$LOG_DIR"
    # The file may hold the password: readable by its owner only.
    (umask 077 && : >"$dir/redis.conf")
    cat >"$dir/redis.conf" <<EOF
# Written by infra/redis-cluster.sh on every start; edit the script, not this file.
bind 127.0.0.1
port $port
cluster-enabled yes
cluster-port $((port + BUS_OFFSET))
cluster-config-file nodes.conf
cluster-node-timeout 5000
protected-mode yes
daemonize yes
pidfile $(pid_file "$port")
logfile $(node_log "$port")
dir $dir
appendonly yes
appendfsync everysec
save ""
EOF
    if [[ -n $CLUSTER_PASSWORD ]]; then
        # A quoted string in redis.conf: escape backslashes and double quotes. masterauth lets a
        # replica (added by hand) authenticate to its master with the same password.
        local quoted=${CLUSTER_PASSWORD//\\/\\\\}
        quoted=${quoted//\"/\\\"}
        printf 'requirepass "%s"\nmasterauth "%s"\n' "$quoted" "$quoted" >>"$dir/redis.conf"
    fi
}

ping() { [[ $(cli "$1" ping 2>/dev/null) == PONG ]]; }
cluster_ok() { cli "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }
slots_assigned() { cli "$1" cluster info 2>/dev/null | grep -q '^cluster_slots_assigned:16384'; }

start_node() {
    local port=$1 pid
    if pid=$(node_pid "$port"); then
        log "node 127.0.0.1:$port already running (pid $pid)"
        return 0
    fi
    rm -f "$(pid_file "$port")"
    if port_open "$port"; then
        die "port $port is already taken by $(port_owner "$port"); choose other ports with" \
            "RECSTACK_REDIS_CLUSTER_PORT=..."
    fi
    write_config "$port"
    setsid redis-server "$STATE_ROOT/$port/redis.conf" </dev/null >>"$(node_log "$port")" 2>&1 ||
        {
            tail_log "$(node_log "$port")"
            die "redis-server on port $port did not start (log: $(node_log "$port"))"
        }
    local deadline=$((SECONDS + 30))
    until ping "$port"; do
        if ((SECONDS >= deadline)); then
            tail_log "$(node_log "$port")"
            die "redis-server on port $port does not answer PING after 30s"
        fi
        sleep 0.1
    done
}

start() {
    install_redis
    local port addresses=()
    for port in $(ports); do
        start_node "$port"
        addresses+=("127.0.0.1:$port")
    done
    if ! slots_assigned "$BASE_PORT"; then
        log "creating the cluster: ${addresses[*]} (3 masters, no replicas)"
        auth_cli redis-cli --cluster create "${addresses[@]}" --cluster-replicas 0 --cluster-yes \
            >>"$LOG_FILE" 2>&1 || {
            tail_log "$LOG_FILE"
            die "redis-cli --cluster create failed (log: $LOG_FILE)"
        }
    fi
    local deadline=$((SECONDS + 60))
    for port in $(ports); do
        until cluster_ok "$port"; do
            if ((SECONDS >= deadline)); then
                cli "$port" cluster info >&2 || true
                die "node 127.0.0.1:$port does not report cluster_state:ok after 60s"
            fi
            sleep 0.2
        done
    done
    log "ready: redis+cluster://127.0.0.1:$BASE_PORT${CLUSTER_PASSWORD:+ (password required)} (nodes ${addresses[*]}); logs: $LOG_DIR/redis-cluster-*.log"
}

stop() {
    local port pid any=0
    for port in $(ports); do
        if pid=$(node_pid "$port"); then
            any=1
            log "stopping node 127.0.0.1:$port (pid $pid)"
            stop_pid "$pid" "redis-server $port" "$STOP_TIMEOUT"
        fi
        rm -f "$(pid_file "$port")"
    done
    if ((any)); then log "stopped"; else log "not running"; fi
}

status() {
    local pids
    if pids=$(running_pid) && cluster_ok "$BASE_PORT"; then
        log "running (pids $pids) at redis+cluster://127.0.0.1:$BASE_PORT"
        return 0
    fi
    local port
    for port in $(ports); do
        if ! node_pid "$port" >/dev/null && port_open "$port"; then
            log "port $port is taken by $(port_owner "$port"), not by a node this script started"
        fi
    done
    log "stopped (or not every node is up)"
    return 3
}

flush() {
    local port
    for port in $(ports); do
        # FLUSHALL on a replica is refused; every node here is a master.
        [[ $(cli "$port" flushall 2>&1) == OK ]] || die "FLUSHALL on 127.0.0.1:$port failed"
    done
    log "flushed"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
restart)
    stop
    start
    ;;
status) status ;;
flush) flush ;;
*)
    echo "usage: $0 start|stop|restart|status|flush" >&2
    exit 2
    ;;
esac
