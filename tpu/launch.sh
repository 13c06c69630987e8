#!/usr/bin/env bash
# Start `python -m jaxgen.train` on every worker of a TPU VM or pod slice.
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: tpu/launch.sh --config jaxgen/configs/NAME.py (--bucket BUCKET | --workdir DIR) [options]
                     [-- --config.key=value ...]

Start training on every worker (--worker=all) of the TPU NAME, in the background
(nohup): each worker runs the same command, with JAXGEN_DISTRIBUTED=1 so that
jaxgen calls jax.distributed.initialize(), which finds the other hosts of the
slice from the TPU metadata; no coordinator address is passed. Each worker
logs to ~/jaxgen-logs/RUN.log and keeps the process id in ~/jaxgen-logs/RUN.pid
(see tpu/logs.sh and tpu/stop.sh). Checkpoints go to the workdir, which all
workers must share: a gs:// path. Launching again with the same workdir resumes
from its latest checkpoint. Arguments after `--` are passed to jaxgen.train.

options (environment variable in brackets):
  --name NAME          TPU name [TPU_NAME, default jaxgen]
  --zone ZONE          zone [ZONE, default us-central2-b]
  --project PROJECT    project [PROJECT, default: gcloud's configured one]
  --config FILE        config file, relative to the repository [CONFIG]
  --run RUN            run name, for the logs and the default workdir
                       [RUN_NAME, default: the TPU name]
  --bucket BUCKET      bucket for the default workdir gs://BUCKET/runs/RUN [BUCKET]
  --workdir DIR        workdir (default gs://BUCKET/runs/RUN)
  --tfds-data-dir DIR  TFDS_DATA_DIR on the workers, an absolute path (default
                       ~/tensorflow_datasets,
                       where tpu/setup.sh --tfds-data copies it)
  --dry-run            print the commands, run nothing
  -h, --help           this help
EOF
}

CONFIG=${CONFIG:-}
WORKDIR=""
TFDS_DIR=""
VALUE_OPTS+=("config CONFIG" "run RUN_NAME" "bucket BUCKET" "workdir WORKDIR"
  "tfds-data-dir TFDS_DIR")
parse_args "$@"
require CONFIG config
gcloud_flags
run_name
if [[ -z $WORKDIR ]]; then
  if [[ -z $BUCKET ]]; then
    usage_error "missing --workdir or --bucket (or set BUCKET)"
  fi
  BUCKET=${BUCKET#gs://}
  WORKDIR="gs://${BUCKET%/}/runs/$RUN_NAME"
fi

# The multi-host runtime is started explicitly: a TPU VM's environment rarely names the
# slice's hosts (TPU_WORKER_HOSTNAMES), JAX reads them from the VM metadata.
train_env=(JAXGEN_DISTRIBUTED=1)
if [[ -n $TFDS_DIR ]]; then
  train_env+=("TFDS_DATA_DIR=$TFDS_DIR")
fi
train=(env "${train_env[@]}" "../$REMOTE_VENV/bin/python" -m jaxgen.train --config "$CONFIG"
  --workdir "$WORKDIR" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
log=../$REMOTE_LOGS/$RUN_NAME
# Braces keep `&` on nohup alone, so $! is the trainer's pid (nohup and env exec it).
command="mkdir -p $REMOTE_LOGS && cd $REMOTE_REPO && { nohup $(quote_all "${train[@]}")"
command+=" > $log.log 2>&1 < /dev/null & echo \$! > $log.pid; }"
on_workers all "$command"
