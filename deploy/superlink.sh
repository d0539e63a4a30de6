#!/usr/bin/env bash
# Start the federation's SuperLink on the coordinator host (Flower 1.42).
#
#   deploy/superlink.sh CERTS_DIR STATE_DIR [HOST [PORT]]
#
# CERTS_DIR holds ca.pem, superlink.pem and superlink.key from `fedvitgan certs` (the key, and ca.key
# if it is there at all, must not be readable by group or others); STATE_DIR gets
# the persistent database (state.db: registered SuperNodes, runs) and, unless FLWR_HOME is set, the
# SuperLink's FLWR_HOME. HOST defaults to 127.0.0.1: in Flower 1.42 the one port serves the Fleet
# API (hospitals) *and* the Control API (anyone who reaches it can submit runs) and the Runtime
# API. Read docs/deployment.md, "What to expose", before using 0.0.0.0.
# Run it from the folder that relative `output_dir` values should resolve against.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0" >&2
    exit 2
fi
CERTS_DIR=$1
STATE_DIR=$2
HOST=${3:-127.0.0.1}
PORT=${4:-8000}
for f in ca.pem superlink.pem superlink.key; do
    [[ -r "$CERTS_DIR/$f" ]] || { echo "superlink.sh: cannot read $CERTS_DIR/$f (run: fedvitgan certs $CERTS_DIR --san <public name>)" >&2; exit 1; }
done
# The TLS private key must be readable by its owner only (fedvitgan certs writes it 0600).
for f in superlink.key ca.key; do
    [[ -e "$CERTS_DIR/$f" ]] || continue
    MODE=$(stat -L -c %a "$CERTS_DIR/$f" 2>/dev/null || stat -L -f %Lp "$CERTS_DIR/$f")
    if (( 8#$MODE & 8#077 )); then
        echo "superlink.sh: $CERTS_DIR/$f is readable by others (mode $MODE); run: chmod 600 $CERTS_DIR/$f" >&2
        exit 1
    fi
done
mkdir -p "$STATE_DIR"
export FLWR_TELEMETRY_ENABLED=0
export FLWR_HOME=${FLWR_HOME:-$STATE_DIR/flwr-home}
exec flower-superlink \
    --ssl-ca-certfile "$CERTS_DIR/ca.pem" \
    --ssl-certfile "$CERTS_DIR/superlink.pem" \
    --ssl-keyfile "$CERTS_DIR/superlink.key" \
    --enable-supernode-auth \
    --disable-runtime-dependency-installation \
    --database "$STATE_DIR/state.db" \
    --host "$HOST" \
    --port "$PORT"
