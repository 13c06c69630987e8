#!/usr/bin/env bash
# Delete a TPU VM or pod slice (and its queued resource, if it came from one).
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: tpu/delete.sh [options]

Delete the TPU NAME. Checkpoints and logs on the bucket stay; what is on the
workers' disks (the logs in ~/jaxgen-logs) goes with them.

options (environment variable in brackets):
  --name NAME        TPU name [TPU_NAME, default jaxgen]
  --zone ZONE        zone [ZONE, default us-central2-b]
  --project PROJECT  project [PROJECT, default: gcloud's configured one]
  --queued           delete the queued resource NAME and its TPU (made by create.sh --queued)
  --yes              do not ask for confirmation (passes --quiet to gcloud)
  --dry-run          print the commands, run nothing
  -h, --help         this help
EOF
}

QUEUED=0 YES=0
SWITCH_OPTS+=("queued QUEUED" "yes YES")
parse_args "$@"
if ((${#EXTRA_ARGS[@]})); then
  usage_error "unexpected arguments after --"
fi
gcloud_flags

if ((QUEUED)); then
  args=(gcloud compute tpus queued-resources delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --force)
else
  args=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}")
fi
if ((YES)); then
  args+=(--quiet)
fi
run "${args[@]}"
