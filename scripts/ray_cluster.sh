#!/usr/bin/env bash
# Multi-node Ray cluster for fipo-train: start a head, join workers, launch a recipe.
#
# Every node needs the same installation (same Python env, fipo-trainer installed the same
# way) and the same model/data paths (a shared filesystem or identical copies).
set -euo pipefail

RAY_BIN="${RAY_BIN:-ray}"
FIPO_TRAIN="${FIPO_TRAIN:-fipo-train}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
DASHBOARD_HOST="${DASHBOARD_HOST:-127.0.0.1}"
PRINT_ONLY="${PRINT_ONLY:-0}"
# Token authentication on every node and every client (Ray >= 2.52): the GCS, the dashboard
# and the job API answer only requests carrying the cluster's token. The head creates
# ~/.ray/auth_token if there is none; copy that file to every node (or point
# RAY_AUTH_TOKEN_PATH at a copy on a shared filesystem) before their 'worker' command.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

usage() {
  cat <<EOF
Usage: scripts/ray_cluster.sh COMMAND [ARGS...]

Commands:
  head [RAY_START_ARGS...]          start the Ray head on this node (port \$RAY_PORT=${RAY_PORT})
  worker HEAD_ADDR [RAY_START_ARGS...]
                                    join this node to the head (HEAD_ADDR = host or host:port)
  launch RECIPE [OVERRIDES...]      run fipo-train on the cluster from the head node:
                                    fipo-train recipe=RECIPE resources.ray_address=auto OVERRIDES
  submit RECIPE [OVERRIDES...]      the same as a Ray job (ray job submit --no-wait) via the
                                    head's dashboard (\$DASHBOARD_PORT=${DASHBOARD_PORT}); follow it with
                                    'ray job logs -f JOB_ID'
  status                            ray status (nodes, GPUs, running work)
  stop                              ray stop on this node (all Ray processes of this user)

Environment: RAY_AUTH_MODE (token; the token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
             ~/.ray/auth_token, created by 'head' if missing: copy it to every node),
             RAY_BIN (ray), FIPO_TRAIN (fipo-train), RAY_PORT (6379), DASHBOARD_PORT (8265),
             DASHBOARD_HOST (127.0.0.1: the dashboard and job API answer on the head only;
             set the head's cluster IP to submit from other machines, never 0.0.0.0),
             PRINT_ONLY=1 prints the commands instead of running them.

Example (16 nodes x 8 GPUs, the 32B FIPO recipe):
  node 0:      scripts/ray_cluster.sh head --num-gpus 8
  nodes 1-15:  scripts/ray_cluster.sh worker 10.0.0.1 --num-gpus 8
  node 0:      scripts/ray_cluster.sh status    # expect 128 GPUs
  node 0:      scripts/ray_cluster.sh launch fipo_qwen2.5_32b_aime24 \\
                 model.path=/shared/models/Qwen2.5-32B data.data_dir=/shared/data
EOF
}

run() {
  if [[ "$PRINT_ONLY" == "1" ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

need_args() {
  if (($1 < $2)); then
    echo "error: '$3' needs $4" >&2
    usage >&2
    exit 2
  fi
}

# The head's token: kept if one is configured, else created in ~/.ray/auth_token.
ensure_token() {
  [[ "$RAY_AUTH_MODE" == token ]] || return 0
  [[ -n "${RAY_AUTH_TOKEN:-}" ]] && return 0
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
      echo "error: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty: write the" \
        "cluster's token there (e.g. ray get-auth-token --generate, then copy ~/.ray/auth_token)" >&2
      exit 2
    fi
    return 0
  fi
  run "$RAY_BIN" get-auth-token --generate >/dev/null
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  head)
    if [[ "$DASHBOARD_HOST" == 0.0.0.0 || "$DASHBOARD_HOST" == "::" ]]; then
      echo "error: DASHBOARD_HOST=$DASHBOARD_HOST would serve the dashboard and job API" \
        "(unauthenticated) on every interface: use 127.0.0.1 or the head's cluster IP" >&2
      exit 2
    fi
    ensure_token
    run "$RAY_BIN" start --head --port="$RAY_PORT" --dashboard-host="$DASHBOARD_HOST" \
      --dashboard-port="$DASHBOARD_PORT" --disable-usage-stats "$@"
    ;;
  worker)
    need_args $# 1 worker "the head address (host or host:port)"
    head="$1"
    shift
    [[ "$head" == *:* ]] || head="$head:$RAY_PORT"
    run "$RAY_BIN" start --address="$head" --disable-usage-stats "$@"
    ;;
  launch)
    need_args $# 1 launch "a recipe name (see recipes/)"
    recipe="$1"
    shift
    run "$FIPO_TRAIN" "recipe=$recipe" resources.ray_address=auto "$@"
    ;;
  submit)
    need_args $# 1 submit "a recipe name (see recipes/)"
    recipe="$1"
    shift
    run "$RAY_BIN" job submit --address="http://$DASHBOARD_HOST:$DASHBOARD_PORT" --no-wait -- \
      "$FIPO_TRAIN" "recipe=$recipe" resources.ray_address=auto "$@"
    ;;
  status)
    run "$RAY_BIN" status "$@"
    ;;
  stop)
    run "$RAY_BIN" stop "$@"
    ;;
  -h | --help | help)
    usage
    ;;
  "")
    usage >&2
    exit 2
    ;;
  *)
    echo "error: unknown command '$cmd'" >&2
    usage >&2
    exit 2
    ;;
esac
