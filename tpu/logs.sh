#!/usr/bin/env bash
# Stream the log of a run started by tpu/launch.sh from one, several or all workers.
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: tpu/logs.sh [options]

Follow ~/jaxgen-logs/RUN.log (tail -F) on the given worker(s) until interrupted.
Worker 0 runs process 0, which shows the progress bar and evaluation results;
the others log little beyond errors.

options (environment variable in brackets):
  --name NAME        TPU name [TPU_NAME, default jaxgen]
  --zone ZONE        zone [ZONE, default us-central2-b]
  --project PROJECT  project [PROJECT, default: gcloud's configured one]
  --run RUN          run name [RUN_NAME, default: the TPU name]
  --worker W         0, 1, ..., a list such as 0,2, or all [WORKER, default 0]
  --lines N          lines of history to show first [default 100]
  --dry-run          print the commands, run nothing
  -h, --help         this help
EOF
}

WORKER=${WORKER:-0}
LINES=100
VALUE_OPTS+=("run RUN_NAME" "worker WORKER" "lines LINES")
parse_args "$@"
if ((${#EXTRA_ARGS[@]})); then
  usage_error "unexpected arguments after --"
fi
if [[ ! $WORKER =~ ^(all|[0-9]+(,[0-9]+)*)$ ]]; then
  usage_error "--worker must be all, a number or a list such as 0,2; got '$WORKER'"
fi
if [[ ! $LINES =~ ^[0-9]+$ ]]; then
  usage_error "--lines must be a number; got '$LINES'"
fi
gcloud_flags
run_name
on_workers "$WORKER" "tail -n $LINES -F $REMOTE_LOGS/$RUN_NAME.log"
