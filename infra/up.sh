#!/usr/bin/env bash
# Start the local Kafka broker and Redis server (`make up`), create the topics (rank-impressions with
# as many partitions as user-events: the attribution consumer joins them per partition), say where the logs are.
# Idempotent: whatever is already running from an earlier `make up` is left as it is.
COMPONENT=up
# shellcheck source=infra/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PARTITIONS="${RECSTACK_PARTITIONS:-6}"

"$REPO_ROOT/infra/kafka.sh" start
need_python
"$PYTHON" "$REPO_ROOT/infra/kafka/admin.py" --bootstrap "127.0.0.1:$KAFKA_PORT" --timeout 60 \
    --topic "user-events:$PARTITIONS" --topic "user-events.dlq:$PARTITIONS" \
    --topic "rank-impressions:$PARTITIONS"
"$REPO_ROOT/infra/redis.sh" start

log "Kafka  127.0.0.1:$KAFKA_PORT   log: $LOG_DIR/kafka.log"
log "Redis  redis://127.0.0.1:$REDIS_PORT/0   log: $LOG_DIR/redis.log"
log "stop both with 'make down'"
