#!/usr/bin/env bash
# The local Redis server (the Feast online store), our own instance rather than the distro service.
#
#   infra/redis.sh start|stop|restart|status
#
# Installs Debian's redis-server package when it is missing. Configuration, data (AOF, fsync
# every second), pid file and log live in the state directory ($RECSTACK_RUN_DIR, default .run/).
# Environment: RECSTACK_REDIS_PORT (6379), RECSTACK_REDIS_STOP_TIMEOUT (seconds, 20),
# RECSTACK_REDIS_PASSWORD (unset: no password; set: clients must AUTH with it, and the services
# read the same variable), RECSTACK_REDIS_SOCKET (unset: none; a path: also listen on that Unix
# socket, owner only, for unix:///PATH?db=N URLs). The server listens on 127.0.0.1 only.
COMPONENT=redis
# shellcheck source=infra/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STATE_DIR="$RUN_DIR/redis"
CONFIG="$STATE_DIR/redis.conf"
PID_FILE="$RUN_DIR/redis.pid"
LOG_FILE="$LOG_DIR/redis.log"
STOP_TIMEOUT="${RECSTACK_REDIS_STOP_TIMEOUT:-20}"
REDIS_PASSWORD="${RECSTACK_REDIS_PASSWORD:-}"
REDIS_SOCKET="${RECSTACK_REDIS_SOCKET:-}"

# redis-server rewrites its argv to "redis-server 127.0.0.1:PORT", so the marker is the address.
running_pid() { pid_from_file "$PID_FILE" "redis-server 127.0.0.1:$REDIS_PORT"; }

install_redis() {
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
    apt_install redis-server redis-tools
}

write_config() {
    mkdir -p "$STATE_DIR" "$LOG_DIR"
    # The file may hold the password: readable by its owner only.
    (umask 077 && : >"$CONFIG")
    cat >"$CONFIG" <<EOF
# Written by infra/redis.sh on every start; edit the script, not this file.
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
daemonize yes
pidfile $PID_FILE
logfile $LOG_FILE
dir $STATE_DIR
# Durable enough for a feature store: the append-only file, fsync once per second.
appendonly yes
appendfsync everysec
save ""
databases 16
EOF
    if [[ -n $REDIS_PASSWORD ]]; then
        # A quoted string in redis.conf: escape backslashes and double quotes.
        local quoted=${REDIS_PASSWORD//\\/\\\\}
        quoted=${quoted//\"/\\\"}
        printf 'requirepass "%s"\n' "$quoted" >>"$CONFIG"
    fi
    if [[ -n $REDIS_SOCKET ]]; then
        printf 'unixsocket "%s"\nunixsocketperm 700\n' "$REDIS_SOCKET" >>"$CONFIG"
    fi
}

# redis-cli reads the password from REDISCLI_AUTH, which keeps it off the command line.
cli() {
    if [[ -n $REDIS_PASSWORD ]]; then
        REDISCLI_AUTH=$REDIS_PASSWORD redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"
    else
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"
    fi
}

ping() {
    [[ $(cli ping 2>/dev/null) == PONG ]]
}

start() {
    local pid
    if pid=$(running_pid); then
        log "already running (pid $pid) on 127.0.0.1:$REDIS_PORT"
        return 0
    fi
    rm -f "$PID_FILE"
    if port_open "$REDIS_PORT"; then
        die "port $REDIS_PORT is already taken by $(port_owner "$REDIS_PORT"), not by a Redis that" \
            "'make up' started; stop it (e.g. 'service redis-server stop'), or choose another port" \
            "with RECSTACK_REDIS_PORT=..."
    fi
    install_redis
    write_config
    log "starting redis-server on 127.0.0.1:$REDIS_PORT${REDIS_PASSWORD:+ (password required)}"
    # setsid: the server outlives this script and ignores a Ctrl-C aimed at make.
    setsid redis-server "$CONFIG" </dev/null >>"$LOG_FILE" 2>&1 ||
        {
            tail_log "$LOG_FILE"
            die "redis-server did not start (log: $LOG_FILE)"
        }
    local deadline=$((SECONDS + 30))
    until ping; do
        if ((SECONDS >= deadline)); then
            tail_log "$LOG_FILE"
            die "redis-server does not answer PING after 30s (log: $LOG_FILE)"
        fi
        sleep 0.1
    done
    pid=$(running_pid) || die "redis-server answers but its pid file $PID_FILE is missing"
    log "ready (pid $pid) on 127.0.0.1:$REDIS_PORT; log: $LOG_FILE"
}

stop() {
    local pid
    if pid=$(running_pid); then
        log "stopping redis-server (pid $pid)"
        # SIGTERM makes Redis fsync the append-only file before it exits.
        stop_pid "$pid" redis "$STOP_TIMEOUT"
        log "stopped"
    else
        log "not running"
    fi
    rm -f "$PID_FILE"
}

status() { report_status "$REDIS_PORT"; }

run_command "$@"
