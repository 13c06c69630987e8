#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice (directly, or through a queued resource).
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: tpu/create.sh [options]

Create the TPU VM or pod slice NAME (one VM per host of the slice).

options (environment variable in brackets):
  --name NAME              TPU name [TPU_NAME, default jaxgen]
  --zone ZONE              zone [ZONE, default us-central2-b]
  --project PROJECT        project [PROJECT, default: gcloud's configured one]
  --accelerator-type TYPE  e.g. v4-8, v4-32, v5p-64 [ACCELERATOR_TYPE, default v4-32]
  --version VERSION        TPU software (runtime) version
                           [RUNTIME_VERSION, default tpu-ubuntu2204-base]
  --spot                   a Spot TPU: cheaper, can be preempted at any time
  --preemptible            a preemptible TPU (the older kind; not with --queued)
  --queued                 request it as a queued resource named NAME: it is created
                           when capacity is there (watch it with
                           `gcloud compute tpus queued-resources describe NAME`)
  --dry-run                print the commands, run nothing
  -h, --help               this help
EOF
}

SPOT=0 PREEMPTIBLE=0 QUEUED=0
VALUE_OPTS+=("accelerator-type ACCELERATOR_TYPE" "version RUNTIME_VERSION")
SWITCH_OPTS+=("spot SPOT" "preemptible PREEMPTIBLE" "queued QUEUED")
parse_args "$@"
if ((${#EXTRA_ARGS[@]})); then
  usage_error "unexpected arguments after --"
fi
require ACCELERATOR_TYPE accelerator-type
require RUNTIME_VERSION version
if ((SPOT && PREEMPTIBLE)); then
  usage_error "give --spot or --preemptible, not both"
fi
gcloud_flags

if ((QUEUED)); then
  if ((PREEMPTIBLE)); then
    usage_error "queued resources take --spot, not --preemptible"
  fi
  args=(gcloud compute tpus queued-resources create "$TPU_NAME" "--node-id=$TPU_NAME"
    "${GCLOUD_FLAGS[@]}" "--accelerator-type=$ACCELERATOR_TYPE"
    "--runtime-version=$RUNTIME_VERSION")
else
  args=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
    "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
fi
if ((SPOT)); then
  args+=(--spot)
fi
if ((PREEMPTIBLE)); then
  args+=(--preemptible)
fi
run "${args[@]}"
