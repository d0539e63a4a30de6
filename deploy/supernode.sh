#!/usr/bin/env bash
# Start one hospital's SuperNode (Flower 1.42).
#
#   deploy/supernode.sh SUPERLINK_ADDRESS CA_PEM PRIVATE_KEY NODE_CONFIG [flower-supernode flags...]
#
#   deploy/supernode.sh superlink.example.org:443 /etc/fedvitgan/ca.pem /etc/fedvitgan/charite \
#       'site-id=0 num-sites=3 site-name="charite" dataset="pcam" data-root="/data/pcam" state-dir="/var/lib/fedvitgan" device="cuda" privacy-required=true max-epsilon=8.0 app-sha256="<fedvitgan fab hash of the release you reviewed>"'
#
# String values in NODE_CONFIG must be double-quoted. NODE_CONFIG is the hospital's own policy too
# (data-root, state-dir, privacy-required, privacy-scope, min-noise-multiplier, max-epsilon,
# max-grad-norm): the coordinator's run config can never loosen it (docs/deployment.md).
# app-sha256 pins the app code this hospital approved (docs/deployment.md): every ClientApp task runs
# through `fedvitgan superexec`, which checks the FAB the coordinator ships against it before any of
# its code is installed or imported. Without app-sha256 this script refuses to start, unless
#   --allow-any-app  runs whatever app the coordinator ships: its code, including the policy checks
#           that enforce NODE_CONFIG, is then the coordinator's, not a release this hospital reviewed.
# Extra flags go to flower-supernode, e.g. `--port 9095` when two SuperNodes share a host, except:
#   --warm  run each message's ClientApp as a fork of a process that imported torch once (the
#           SuperExec preloads it; the SuperNode is `fedvitgan supernode`), and look for messages
#           every second instead of every 3 s (`--idle-poll-s S` changes it): about 5 s less per
#           message. Without it each ClientApp imports torch itself, as `flwr-clientapp` would.
# SuperNode and SuperExec are authenticated to each other by a random secret in
# $FLWR_HOME/superexec.secret; the Runtime API is on 127.0.0.1 (`--port` may change).
# Do not pass --isolation yourself; for a SuperExec in another container see docs/deployment.md.
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
WARM=0
ANY_APP=0
RUNTIME_PORT=9094
FLAGS=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --warm) WARM=1; shift ;;
        --allow-any-app) ANY_APP=1; shift ;;
        --port) RUNTIME_PORT=${2:?supernode.sh: --port needs a value}; FLAGS+=("$1" "$2"); shift 2 ;;
        --port=*) RUNTIME_PORT=${1#--port=}; FLAGS+=("$1"); shift ;;
        --isolation|--isolation=*) echo "supernode.sh: do not pass --isolation (use --warm or nothing)" >&2; exit 2 ;;
        *) FLAGS+=("$1"); shift ;;
    esac
done
if [[ ! $NODE_CONFIG =~ (^|[[:space:]])app-sha256= ]]; then
    if [[ $ANY_APP == 1 ]]; then
        echo "supernode.sh: --allow-any-app: this hospital runs whatever app the coordinator ships; its policy" \
             "checks are then the coordinator's code, not a release this hospital reviewed" >&2
    else
        echo "supernode.sh: NODE_CONFIG has no app-sha256: this hospital would run whatever code the coordinator" \
             "ships, including the checks that enforce its own policy. Review the release, then pin it:" \
             "app-sha256=\"\$(fedvitgan fab hash PROJECT_DIR)\" in NODE_CONFIG; or pass --allow-any-app to" \
             "give that up knowingly" >&2
        exit 2
    fi
fi
command -v fedvitgan > /dev/null || { echo "supernode.sh: needs the fedvitgan command on PATH" >&2; exit 1; }
SECRET="$FLWR_HOME/superexec.secret"
if [[ ! -s "$SECRET" ]]; then
    (umask 077 && mkdir -p "$FLWR_HOME" && head -c 32 /dev/urandom > "$SECRET")
fi
PRELOAD=()
if [[ $WARM == 1 ]]; then
    SUPERNODE=(fedvitgan supernode)
else
    for flag in ${FLAGS[@]+"${FLAGS[@]}"}; do
        [[ $flag == --idle-poll-s* ]] && { echo "supernode.sh: --idle-poll-s needs --warm" >&2; exit 2; }
    done
    PRELOAD=(--preload "")  # cold: each ClientApp imports torch itself
    SUPERNODE=(flower-supernode)
fi
# The SuperExec (it checks app-sha256) stops when this process (the SuperNode, after exec) does; if
# it stops while the SuperNode runs, it is started again.
(
    while kill -0 $$ 2> /dev/null; do
        fedvitgan superexec --runtime-api-address "127.0.0.1:$RUNTIME_PORT" --insecure \
            --superexec-auth-secret-file "$SECRET" --parent-pid $$ ${PRELOAD[@]+"${PRELOAD[@]}"} || true
        if kill -0 $$ 2> /dev/null; then
            echo "supernode.sh: fedvitgan superexec stopped; starting it again in 2 s" >&2
            sleep 2
        fi
    done
) &
FLAGS+=(--isolation process --superexec-auth-secret-file "$SECRET")
exec "${SUPERNODE[@]}" \
    --superlink "$SUPERLINK" \
    --root-certificates "$CA_PEM" \
    --auth-supernode-private-key "$PRIVATE_KEY" \
    --node-config "$NODE_CONFIG" \
    ${FLAGS[@]+"${FLAGS[@]}"}
