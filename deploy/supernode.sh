#!/usr/bin/env bash
# Start one hospital's SuperNode (Flower 1.42).
#
#   deploy/supernode.sh SUPERLINK_ADDRESS CA_PEM PRIVATE_KEY NODE_CONFIG [flower-supernode flags...]
#
#   deploy/supernode.sh superlink.example.org:443 /etc/fedvitgan/ca.pem /etc/fedvitgan/charite \
#       'site-id=0 num-sites=3 site-name="charite" dataset="pcam" data-root="/data/pcam" state-dir="/var/lib/fedvitgan" device="cuda" privacy-required=true max-epsilon=8.0'
#
# String values in NODE_CONFIG must be double-quoted. NODE_CONFIG is the hospital's own policy too
# (data-root, state-dir, privacy-required, privacy-scope, min-noise-multiplier, max-epsilon,
# max-grad-norm): the coordinator's run config can never loosen it (docs/deployment.md).
# Extra flags go to flower-supernode, e.g. `--port 9095` when two SuperNodes share a host. Keep the
# default subprocess isolation; `--isolation process` needs a SuperExec secured with TLS and
# --superexec-auth-secret-file, never --insecure (docs/deployment.md).
# Only outgoing HTTPS to SUPERLINK_ADDRESS is needed; the local Runtime API stays on 127.0.0.1.
set -euo pipefail
if [[ $# -lt 4 ]]; then
    awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0" >&2
    exit 2
fi
SUPERLINK=$1
CA_PEM=$2
PRIVATE_KEY=$3
NODE_CONFIG=$4
shift 4
for f in "$CA_PEM" "$PRIVATE_KEY"; do
    [[ -r "$f" ]] || { echo "supernode.sh: cannot read $f" >&2; exit 1; }
done
export FLWR_TELEMETRY_ENABLED=0
export FLWR_HOME=${FLWR_HOME:-$HOME/.flwr}
exec flower-supernode \
    --superlink "$SUPERLINK" \
    --root-certificates "$CA_PEM" \
    --auth-supernode-private-key "$PRIVATE_KEY" \
    --node-config "$NODE_CONFIG" \
    "$@"
