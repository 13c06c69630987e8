#!/usr/bin/env bash
# Stop a run started by tpu/launch.sh: SIGTERM on every worker, so jaxgen checkpoints and exits.
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: tpu/stop.sh [options]

Send SIGTERM to the trainer of run RUN on every worker (the process id in
~/jaxgen-logs/RUN.pid). jaxgen answers SIGTERM by saving a checkpoint at the
current step and exiting, so tpu/launch.sh with the same workdir resumes from it.

options (environment variable in brackets):
  --name NAME        TPU name [TPU_NAME, default jaxgen]
  --zone ZONE        zone [ZONE, default us-central2-b]
  --project PROJECT  project [PROJECT, default: gcloud's configured one]
  --run RUN          run name [RUN_NAME, default: the TPU name]
  --dry-run          print the commands, run nothing
  -h, --help         this help
EOF
}

VALUE_OPTS+=("run RUN_NAME")
parse_args "$@"
if ((${#EXTRA_ARGS[@]})); then
  usage_error "unexpected arguments after --"
fi
gcloud_flags
run_name
on_workers all "kill -TERM \"\$(cat $REMOTE_LOGS/$RUN_NAME.pid)\""
