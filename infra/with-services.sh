#!/usr/bin/env bash
# Run a command with the local Kafka broker and Redis server up (`make test`, `make demo`).
#
#   infra/with-services.sh COMMAND [ARG...]
#
# Starts what is not running yet, runs COMMAND, then stops only what this invocation started
# (also on Ctrl-C), unless KEEP=1. Exits with COMMAND's exit code.
COMPONENT=services
# shellcheck source=infra/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(($# > 0)) || die "usage: $0 COMMAND [ARG...]"

started=()
"$REPO_ROOT/infra/kafka.sh" status >/dev/null 2>&1 || started+=(kafka)
"$REPO_ROOT/infra/redis.sh" status >/dev/null 2>&1 || started+=(redis)

# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ ${KEEP:-0} == 1 ]]; then
        ((${#started[@]} == 0)) || log "KEEP=1: leaving ${started[*]} running (stop with 'make down')"
    else
        local service
        for service in "${started[@]}"; do
            "$REPO_ROOT/infra/$service.sh" stop || true
        done
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$REPO_ROOT/infra/up.sh"
rc=0
"$@" || rc=$?
exit "$rc"
