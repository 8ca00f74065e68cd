#!/usr/bin/env bash
# Start the local Kafka broker and Redis server (`make up`), create the topics (rank-impressions with
# as many partitions as user-events: the attribution consumer joins them per partition), apply the
# Feast registry, say where the logs are.
# Idempotent: whatever is already running from an earlier `make up` is left as it is, and the Feast
# registry is applied only when it does not hold the definitions yet.
COMPONENT=up
# shellcheck source=infra/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PARTITIONS="${RECSTACK_PARTITIONS:-6}"

need_python
# Feast's registry, the one feature_store/feature_store.yaml names (or $FEAST_FS_YAML_FILE_PATH):
# applied here so that FeatureStore(repo_path="feature_store") reads the stream's features with no
# `feast apply` by hand. It touches neither Kafka nor Redis, so it runs while they start (importing
# Feast takes most of its 5-10 s).
mkdir -p "$LOG_DIR"
"$PYTHON" -m feature_store.store >"$LOG_DIR/feast-apply.log" 2>&1 &
feast_pid=$!

"$REPO_ROOT/infra/kafka.sh" start
"$PYTHON" "$REPO_ROOT/infra/kafka/admin.py" --bootstrap "127.0.0.1:$KAFKA_PORT" --timeout 60 \
    --topic "user-events:$PARTITIONS" --topic "user-events.dlq:$PARTITIONS" \
    --topic "rank-impressions:$PARTITIONS"
"$REPO_ROOT/infra/redis.sh" start
wait "$feast_pid" || die "applying the Feast registry failed (python -m feature_store.store): $(tail -n 20 "$LOG_DIR/feast-apply.log")"
log "$(tail -n 1 "$LOG_DIR/feast-apply.log")"
if [[ $REDIS_PORT != 6379 && -z ${FEAST_FS_YAML_FILE_PATH:-} ]]; then
    warn "feature_store/feature_store.yaml reads Redis at 127.0.0.1:6379: for Feast's SDK on port $REDIS_PORT, point FEAST_FS_YAML_FILE_PATH at a copy that names it"
fi

log "Kafka  127.0.0.1:$KAFKA_PORT   log: $LOG_DIR/kafka.log"
log "Redis  redis://127.0.0.1:$REDIS_PORT/0   log: $LOG_DIR/redis.log"
log "Feast  FeatureStore(repo_path=\"feature_store\") from $REPO_ROOT"
log "stop both with 'make down'"
