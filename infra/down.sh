#!/usr/bin/env bash
# Stop what `make up` started, found through its pid files only (`make down`). Fine with nothing running.
COMPONENT=down
# shellcheck source=infra/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

rc=0
"$REPO_ROOT/infra/redis.sh" stop || rc=$?
"$REPO_ROOT/infra/redis-cluster.sh" stop || rc=$? # the local Redis Cluster, if one was started
"$REPO_ROOT/infra/kafka.sh" stop || rc=$?
exit "$rc"
