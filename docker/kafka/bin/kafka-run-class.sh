#!/usr/bin/env bash
# kafka-run-class.sh CLASS [ARG...]: runs a Kafka class with the broker's jars, honouring
# the environment variables of Kafka's own script (KAFKA_HEAP_OPTS, KAFKA_OPTS,
# KAFKA_JVM_PERFORMANCE_OPTS, KAFKA_LOG4J_OPTS), with the tools' quiet logging by default.
set -euo pipefail
[[ $# -gt 0 ]] || { echo "usage: kafka-run-class.sh CLASS [ARG...]" >&2; exit 2; }
# shellcheck disable=SC2086 # the *_OPTS variables are word lists, as in Kafka's script
exec java ${KAFKA_HEAP_OPTS:--Xmx256M} \
  ${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true} \
  ${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=/etc/kafka/docker/tools-log4j2.properties} \
  ${KAFKA_OPTS:-} \
  -cp '/opt/kafka/libs/*' "$@"
