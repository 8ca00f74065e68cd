#!/usr/bin/env bash
# The local single-node Kafka broker (KRaft, broker + controller in one JVM), without Docker.
#
#   infra/kafka.sh start|stop|restart|status
#
# Jars come from Maven Central once per machine (infra/kafka/pom.xml) into
# ~/.cache/recstack/kafka-<version>/libs; configuration, data, pid file and logs live in the
# state directory ($RECSTACK_RUN_DIR, default .run/). Environment: RECSTACK_KAFKA_PORT (9092),
# RECSTACK_KAFKA_CONTROLLER_PORT (port + 1), RECSTACK_KAFKA_HEAP (512m),
# RECSTACK_KAFKA_START_TIMEOUT (seconds, 120), RECSTACK_KAFKA_STOP_TIMEOUT (seconds, 30).
# With RECSTACK_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT (and RECSTACK_KAFKA_SASL_MECHANISM PLAIN,
# SCRAM-SHA-256 or SCRAM-SHA-512, RECSTACK_KAFKA_SASL_USERNAME, RECSTACK_KAFKA_SASL_PASSWORD: the
# variables the clients read) the client listener requires that user, on a fresh state directory.
# The broker listens on 127.0.0.1 only.
COMPONENT=kafka
# shellcheck source=infra/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

POM="$REPO_ROOT/infra/kafka/pom.xml"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")"
[[ -n $KAFKA_VERSION ]] || die "no <kafka.version> in $POM"
LIBS_DIR="$CACHE_ROOT/kafka-$KAFKA_VERSION/libs"
STATE_DIR="$RUN_DIR/kafka"
DATA_DIR="$STATE_DIR/data"
PROPERTIES="$STATE_DIR/server.properties"
LOG4J_CONFIG="$STATE_DIR/log4j2.properties"
PID_FILE="$RUN_DIR/kafka.pid"
LOG_FILE="$LOG_DIR/kafka.log"
OUT_FILE="$LOG_DIR/kafka.out"
HEAP="${RECSTACK_KAFKA_HEAP:-512m}"
START_TIMEOUT="${RECSTACK_KAFKA_START_TIMEOUT:-120}"
STOP_TIMEOUT="${RECSTACK_KAFKA_STOP_TIMEOUT:-30}"

SECURITY_PROTOCOL="${RECSTACK_KAFKA_SECURITY_PROTOCOL:-PLAINTEXT}"
SASL_MECHANISM="${RECSTACK_KAFKA_SASL_MECHANISM:-}"
SASL_USERNAME="${RECSTACK_KAFKA_SASL_USERNAME:-}"
SASL_PASSWORD="${RECSTACK_KAFKA_SASL_PASSWORD:-}"

running_pid() { pid_from_file "$PID_FILE" "$PROPERTIES"; }

# The client listener's lines of server.properties: PLAINTEXT, or SASL_PLAINTEXT for one user.
listener_config() {
    case $SECURITY_PROTOCOL in
    PLAINTEXT)
        printf '%s\n' "listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT" \
            "advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT" \
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT" \
            "inter.broker.listener.name=PLAINTEXT"
        ;;
    SASL_PLAINTEXT)
        # Quoted into JAAS and the SCRAM bootstrap record: keep to characters neither escapes.
        [[ $SASL_USERNAME =~ ^[A-Za-z0-9._~+-]+$ ]] ||
            die "RECSTACK_KAFKA_SASL_USERNAME: the local broker takes letters, digits and ._~+- only"
        [[ $SASL_PASSWORD =~ ^[A-Za-z0-9._~+-]+$ ]] ||
            die "RECSTACK_KAFKA_SASL_PASSWORD: the local broker takes letters, digits and ._~+- only"
        local module users=""
        case $SASL_MECHANISM in
        PLAIN)
            module=org.apache.kafka.common.security.plain.PlainLoginModule
            users=" user_$SASL_USERNAME=\"$SASL_PASSWORD\""
            ;;
        SCRAM-SHA-256 | SCRAM-SHA-512) module=org.apache.kafka.common.security.scram.ScramLoginModule ;;
        *) die "RECSTACK_KAFKA_SASL_MECHANISM must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, got '$SASL_MECHANISM'" ;;
        esac
        printf '%s\n' \
            "listeners=SASL_PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT" \
            "advertised.listeners=SASL_PLAINTEXT://127.0.0.1:$KAFKA_PORT" \
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT" \
            "inter.broker.listener.name=SASL_PLAINTEXT" \
            "sasl.enabled.mechanisms=$SASL_MECHANISM" \
            "sasl.mechanism.inter.broker.protocol=$SASL_MECHANISM" \
            "listener.name.sasl_plaintext.${SASL_MECHANISM,,}.sasl.jaas.config=$module required username=\"$SASL_USERNAME\" password=\"$SASL_PASSWORD\"$users;"
        ;;
    *) die "RECSTACK_KAFKA_SECURITY_PROTOCOL: the local broker runs PLAINTEXT or SASL_PLAINTEXT, got '$SECURITY_PROTOCOL'" ;;
    esac
}

fetch_libs() {
    local pom_sum stamp="$LIBS_DIR/.pom.sha256"
    pom_sum=$(sha256sum "$POM" | cut -d' ' -f1)
    if [[ -f $stamp && $(<"$stamp") == "$pom_sum" ]]; then
        return 0
    fi
    command -v mvn >/dev/null || apt_install maven
    log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS_DIR (once per machine)"
    mkdir -p "$CACHE_ROOT"
    local tmp
    tmp=$(mktemp -d "$CACHE_ROOT/.kafka-$KAFKA_VERSION.XXXXXX")
    if ! (cd "$REPO_ROOT/infra/kafka" &&
        mvn -q -B -Dstyle.color=never dependency:copy-dependencies \
            -DoutputDirectory="$tmp/libs" -DincludeScope=runtime) >"$tmp/mvn.log" 2>&1; then
        tail_log "$tmp/mvn.log"
        rm -rf "$tmp"
        die "Maven could not fetch the Kafka jars"
    fi
    printf '%s\n' "$pom_sum" >"$tmp/libs/.pom.sha256"
    rm -rf "$LIBS_DIR.old"
    [[ -d $LIBS_DIR ]] && mv "$LIBS_DIR" "$LIBS_DIR.old"
    mkdir -p "$(dirname "$LIBS_DIR")"
    mv "$tmp/libs" "$LIBS_DIR"
    rm -rf "$tmp" "$LIBS_DIR.old"
}

write_config() {
    mkdir -p "$STATE_DIR" "$DATA_DIR" "$LOG_DIR"
    local listeners
    listeners=$(listener_config)
    # The file may hold a SASL password: readable by its owner only.
    (umask 077 && : >"$PROPERTIES")
    cat >"$PROPERTIES" <<EOF
# Written by infra/kafka.sh on every start; edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
$listeners
controller.listener.names=CONTROLLER
log.dirs=$DATA_DIR
num.partitions=6
offsets.topic.replication.factor=1
# One broker: a few internal partitions load much faster after a restart than the default 50.
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=6
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
    cat >"$LOG4J_CONFIG" <<EOF
# Written by infra/kafka.sh on every start.
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $LOG_FILE
appender.file.filePattern = $LOG_FILE.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = info
logger.state.name = state.change.logger
logger.state.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
EOF
}

format_storage() {
    [[ -f $DATA_DIR/meta.properties ]] && return 0
    local cluster_id_file="$STATE_DIR/cluster.id" cluster_id
    if [[ ! -s $cluster_id_file ]]; then
        # A Kafka cluster id is 16 random bytes in URL-safe base64 without padding.
        head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' >"$cluster_id_file"
    fi
    cluster_id=$(<"$cluster_id_file")
    log "formatting storage in $DATA_DIR (cluster id $cluster_id)"
    local scram=()
    if [[ $SECURITY_PROTOCOL == SASL_PLAINTEXT && $SASL_MECHANISM == SCRAM-* ]]; then
        # SCRAM credentials live in the metadata log: the broker's own user is written at format.
        scram=(--add-scram "$SASL_MECHANISM=[name=$SASL_USERNAME,password=$SASL_PASSWORD]")
    fi
    java -cp "$LIBS_DIR/*" -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
        kafka.tools.StorageTool format -t "$cluster_id" -c "$PROPERTIES" "${scram[@]}" >>"$OUT_FILE" 2>&1 ||
        {
            tail_log "$OUT_FILE"
            die "formatting the storage failed"
        }
}

wait_ready() {
    local pid=$1 deadline=$((SECONDS + START_TIMEOUT))
    while ! port_open "$KAFKA_PORT"; do
        if ! alive "$pid"; then
            tail_log "$LOG_FILE"
            tail_log "$OUT_FILE"
            rm -f "$PID_FILE"
            die "the broker exited during start-up (logs: $LOG_FILE, $OUT_FILE)"
        fi
        ((SECONDS < deadline)) || die "port $KAFKA_PORT not open after ${START_TIMEOUT}s (log: $LOG_FILE)"
        sleep 0.2
    done
    need_python
    "$PYTHON" "$REPO_ROOT/infra/kafka/admin.py" --bootstrap "127.0.0.1:$KAFKA_PORT" \
        --timeout "$((deadline - SECONDS > 5 ? deadline - SECONDS : 5))" ||
        die "the broker does not answer metadata (log: $LOG_FILE)"
}

start() {
    local pid
    if pid=$(running_pid); then
        log "already running (pid $pid) on 127.0.0.1:$KAFKA_PORT"
        return 0
    fi
    rm -f "$PID_FILE"
    for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
        if port_open "$port"; then
            die "port $port is already taken by $(port_owner "$port"), not by a broker that 'make up' started;" \
                "stop it, or choose other ports with RECSTACK_KAFKA_PORT=... RECSTACK_KAFKA_CONTROLLER_PORT=..."
        fi
    done
    command -v java >/dev/null || apt_install openjdk-17-jre-headless
    fetch_libs
    write_config
    format_storage
    log "starting the broker on 127.0.0.1:$KAFKA_PORT (heap $HEAP, $SECURITY_PROTOCOL${SASL_MECHANISM:+ $SASL_MECHANISM})"
    # setsid: the broker outlives this script and ignores a Ctrl-C aimed at make.
    (cd "$STATE_DIR" && exec setsid java "-Xmx$HEAP" "-Xms$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -Djava.awt.headless=true -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.logs.dir="$LOG_DIR" \
        -cp "$LIBS_DIR/*" kafka.Kafka "$PROPERTIES" >>"$OUT_FILE" 2>&1 </dev/null) &
    pid=$!
    printf '%s\n' "$pid" >"$PID_FILE"
    wait_ready "$pid"
    log "ready (pid $pid) on 127.0.0.1:$KAFKA_PORT; log: $LOG_FILE"
}

stop() {
    local pid
    if pid=$(running_pid); then
        log "stopping the broker (pid $pid)"
        stop_pid "$pid" kafka "$STOP_TIMEOUT"
        log "stopped"
    else
        log "not running"
    fi
    rm -f "$PID_FILE"
}

status() { report_status "$KAFKA_PORT"; }

run_command "$@"
