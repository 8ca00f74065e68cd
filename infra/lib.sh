# shellcheck shell=bash disable=SC2034  # its variables are used by the scripts that source it
# Shared helpers for the scripts that run the local, Docker-free Kafka broker and Redis server.
# Sourced, never executed. Every process is tracked by a pid file in the state directory and
# is stopped through that pid file only.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${RECSTACK_RUN_DIR:-$REPO_ROOT/.run}"
LOG_DIR="$RUN_DIR/logs"
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/recstack"
PYTHON="${RECSTACK_PYTHON:-$REPO_ROOT/.venv/bin/python}"

KAFKA_PORT="${RECSTACK_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${RECSTACK_KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
REDIS_PORT="${RECSTACK_REDIS_PORT:-6379}"

COMPONENT="${COMPONENT:-infra}"

log() { printf '[%s] %s\n' "$COMPONENT" "$*"; }
warn() { printf '[%s] warning: %s\n' "$COMPONENT" "$*" >&2; }
die() {
    printf '[%s] error: %s\n' "$COMPONENT" "$*" >&2
    exit 1
}

# alive PID: the process exists and is not a zombie (PID 1 of a container may never reap it).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# pid_from_file PIDFILE MARKER: print the pid recorded in PIDFILE when that process is alive
# and its command line contains MARKER (so a recycled pid is never mistaken for ours).
pid_from_file() {
    local pidfile=$1 marker=$2 pid cmdline
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] && alive "$pid" || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *"$marker"* ]] || return 1
    printf '%s\n' "$pid"
}

# port_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# port_owner PORT: best-effort description of the process listening on PORT.
port_owner() {
    local owner=""
    if command -v ss >/dev/null 2>&1; then
        owner=$(ss -Htlnp "sport = :$1" 2>/dev/null | grep -o 'users:((.*))' | head -n1 || true)
    fi
    printf '%s\n' "${owner:-an unknown process}"
}

# stop_pid PID NAME TIMEOUT_S: SIGTERM, wait up to TIMEOUT_S, then SIGKILL and wait again.
stop_pid() {
    local pid=$1 name=$2 timeout=$3 waited=0
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid"; do
        if ((waited >= timeout * 10)); then
            warn "$name (pid $pid) still running after ${timeout}s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            waited=0
            while alive "$pid" && ((waited < 100)); do
                sleep 0.1
                waited=$((waited + 1))
            done
            alive "$pid" && die "$name (pid $pid) survived SIGKILL"
            return 0
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

# tail_log FILE: show the end of a log after a failed start.
tail_log() {
    if [[ -s $1 ]]; then
        printf -- '--- last lines of %s ---\n' "$1" >&2
        tail -n 30 "$1" >&2
        printf -- '---\n' >&2
    fi
}

as_root() {
    if [[ $(id -u) == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "installing $* needs root"
    fi
}

# apt_install PACKAGE...: install Debian packages, without letting their services start.
apt_install() {
    command -v apt-get >/dev/null || die "apt-get is not available: install $* yourself"
    log "installing $* with apt-get (once per machine)"
    # Without this guard the package's own service would start and take the port we need.
    local policy=/usr/sbin/policy-rc.d added_policy=0 rc=0
    if [[ ! -e $policy ]]; then
        as_root sh -c "printf '#!/bin/sh\\nexit 101\\n' > $policy && chmod 755 $policy"
        added_policy=1
    fi
    if [[ -z ${RECSTACK_APT_UPDATED:-} ]]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || rc=$?
        export RECSTACK_APT_UPDATED=1
    fi
    ((rc == 0)) && { as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "$@" >/dev/null || rc=$?; }
    ((added_policy)) && as_root rm -f "$policy"
    ((rc == 0)) || die "apt-get install $* failed"
}

need_python() {
    [[ -x $PYTHON ]] || die "$PYTHON not found: run 'make install' first (or set RECSTACK_PYTHON)"
}

# `status` of a service script: its running_pid (defined by the script) and what holds its port.
report_status() {
    local port=$1 pid
    if pid=$(running_pid); then
        log "running (pid $pid) on 127.0.0.1:$port; log: $LOG_FILE"
        return 0
    fi
    if port_open "$port"; then
        log "not started by 'make up', but port $port is taken by $(port_owner "$port")"
    else
        log "stopped"
    fi
    return 3
}

# The start|stop|restart|status entry point shared by kafka.sh and redis.sh.
run_command() {
    case "${1:-}" in
    start) start ;;
    stop) stop ;;
    restart)
        stop
        start
        ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|restart|status" >&2
        exit 2
        ;;
    esac
}
