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
# socket, owner only, for unix:///PATH?db=N URLs), RECSTACK_REDIS_TLS_PORT (unset: none; a port:
# also serve TLS there, with a certificate for 127.0.0.1/localhost signed by a private CA made once
# in the state directory: rediss://127.0.0.1:PORT/0?ssl_ca_certs=STATE_DIR/tls/ca.crt).
# The server listens on 127.0.0.1 only.
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
REDIS_TLS_PORT="${RECSTACK_REDIS_TLS_PORT:-}"
TLS_DIR="$STATE_DIR/tls"

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
    if [[ -n $REDIS_TLS_PORT ]]; then
        write_tls
        # Clients prove nothing but the password (no client certificates): TLS is for privacy here.
        cat >>"$CONFIG" <<EOF
tls-port $REDIS_TLS_PORT
tls-cert-file $TLS_DIR/server.crt
tls-key-file $TLS_DIR/server.key
tls-ca-cert-file $TLS_DIR/ca.crt
tls-auth-clients no
EOF
    fi
}

# A private CA and a server certificate for 127.0.0.1 and localhost, made once (openssl).
write_tls() {
    [[ -s $TLS_DIR/ca.crt && -s $TLS_DIR/server.crt && -s $TLS_DIR/server.key ]] && return 0
    command -v openssl >/dev/null || apt_install openssl
    mkdir -p "$TLS_DIR"
    (
        umask 077
        cd "$TLS_DIR"
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=recstack local Redis CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -keyout ca.key -out ca.crt
        openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
        printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
            "authorityKeyIdentifier=keyid" >server.ext
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile server.ext -out server.crt
        rm -f server.csr server.ext ca.srl
        chmod 644 ca.crt
    ) >>"$LOG_FILE" 2>&1 || die "could not make the TLS certificate for Redis (log: $LOG_FILE)"
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
    log "starting redis-server on 127.0.0.1:$REDIS_PORT${REDIS_PASSWORD:+ (password required)}${REDIS_TLS_PORT:+, TLS on 127.0.0.1:$REDIS_TLS_PORT (CA $TLS_DIR/ca.crt)}"
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
