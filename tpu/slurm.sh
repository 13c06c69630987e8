#!/usr/bin/env bash
# Write an sbatch script that runs `python -m jaxgen.train` on a multi-node GPU cluster, and submit it.
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: tpu/slurm.sh --config jaxgen/configs/NAME.py --workdir DIR [options] [-- --config.key=value ...]

Write an sbatch script to --script and submit it with sbatch. The job runs one
task per GPU (--ntasks-per-node = --gpus-per-node) with `srun python -m
jaxgen.train`: jaxgen sees SLURM_JOB_ID and calls jax.distributed.initialize(),
which reads the coordinator (first node), SLURM_NTASKS and SLURM_PROCID from
the job step, and gives task i of each node its GPU i (SLURM_LOCALID). Every
task must see all GPUs of its node (no per-task GPU binding), and no JAXGEN_*
variable may be set. The workdir must be on a file system all nodes share; a
resubmitted job with the same workdir resumes from its latest checkpoint.
Each task logs to DIR/slurm/JOB-JOBID-TASK.out. Arguments after `--` are
passed to jaxgen.train.

options (environment variable in brackets):
  --config FILE        config file, relative to the repository [CONFIG]
  --workdir DIR        workdir on the shared file system (made absolute)
  --nodes N            nodes [NODES, default 2]
  --gpus-per-node G    GPUs (and tasks) per node [GPUS_PER_NODE, default 8]
  --cpus-per-task C    CPUs per task [default: the cluster's]
  --partition P        partition [PARTITION]
  --account A          account [ACCOUNT]
  --time T             time limit [default 24:00:00]
  --job-name NAME      job name [default jaxgen]
  --python PYTHON      Python with jaxgen and jax[cuda12] installed, on every node
                       [PYTHON, default python3]
  --setup COMMAND      shell line run before srun, e.g. 'source ~/venv/bin/activate'
  --tfds-data-dir DIR  TFDS_DATA_DIR for the job, on the shared file system
  --repo DIR           the jaxgen checkout the job runs in [default: this one]
  --script FILE        where to write the sbatch script
                       [default DIR/slurm/NAME.sbatch]
  --no-submit          write the script, do not submit it
  --dry-run            print the commands and the script, run nothing
  -h, --help           this help
EOF
}

CONFIG=${CONFIG:-}
WORKDIR=""
NODES=${NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=""
PARTITION=${PARTITION:-}
ACCOUNT=${ACCOUNT:-}
TIME_LIMIT=24:00:00
JOB_NAME=jaxgen
PYTHON=${PYTHON:-python3}
SETUP=""
TFDS_DIR=""
REPO=$REPO_ROOT
SCRIPT=""
NO_SUBMIT=0
VALUE_OPTS=("config CONFIG" "workdir WORKDIR" "nodes NODES" "gpus-per-node GPUS_PER_NODE"
  "cpus-per-task CPUS_PER_TASK" "partition PARTITION" "account ACCOUNT" "time TIME_LIMIT"
  "job-name JOB_NAME" "python PYTHON" "setup SETUP" "tfds-data-dir TFDS_DIR" "repo REPO"
  "script SCRIPT")
SWITCH_OPTS=("no-submit NO_SUBMIT")
parse_args "$@"
require CONFIG config
require WORKDIR workdir
require PYTHON python
for pair in "NODES nodes" "GPUS_PER_NODE gpus-per-node" "CPUS_PER_TASK cpus-per-task"; do
  var=${pair% *}
  value=${!var}
  if [[ -n $value && ! $value =~ ^[1-9][0-9]*$ ]]; then
    usage_error "--${pair#* } must be a positive integer; got '$value'"
  fi
done
if [[ ! $JOB_NAME =~ ^[A-Za-z0-9._-]+$ ]]; then
  usage_error "--job-name may hold only letters, digits, '.', '_' and '-'; got '$JOB_NAME'"
fi
if [[ $WORKDIR != /* ]]; then
  WORKDIR=$PWD/$WORKDIR
fi
logs=$WORKDIR/slurm
SCRIPT=${SCRIPT:-$logs/$JOB_NAME.sbatch}

directives=("--job-name=$JOB_NAME" "--nodes=$NODES" "--ntasks-per-node=$GPUS_PER_NODE"
  "--gpus-per-node=$GPUS_PER_NODE" "--time=$TIME_LIMIT" "--output=$logs/%x-%j.out")
[[ -z $CPUS_PER_TASK ]] || directives+=("--cpus-per-task=$CPUS_PER_TASK")
[[ -z $PARTITION ]] || directives+=("--partition=$PARTITION")
[[ -z $ACCOUNT ]] || directives+=("--account=$ACCOUNT")

body="#!/bin/bash"$'\n'
for directive in "${directives[@]}"; do
  body+="#SBATCH $(quote "$directive")"$'\n'
done
body+="# Written by tpu/slurm.sh. One task per GPU: jaxgen calls jax.distributed.initialize(),"$'\n'
body+="# which reads the job step's SLURM_* variables; task i of a node uses its GPU i."$'\n'
body+="set -eo pipefail  # no -u: \`module\` and conda's activate read unset variables"$'\n'
body+="cd $(quote "$REPO")"$'\n'
[[ -z $SETUP ]] || body+="$SETUP"$'\n'
[[ -z $TFDS_DIR ]] || body+="export TFDS_DATA_DIR=$(quote "$TFDS_DIR")"$'\n'
body+="$(quote_all srun --kill-on-bad-exit=1 "--output=$logs/%x-%j-%t.out" \
  "$PYTHON" -m jaxgen.train --config "$CONFIG" --workdir "$WORKDIR" \
  ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})"$'\n'

dirs=("$logs")
[[ $(dirname "$SCRIPT") == "$logs" ]] || dirs+=("$(dirname "$SCRIPT")")
run mkdir -p "${dirs[@]}"
write_file "$SCRIPT" "$body"
if ((!NO_SUBMIT)); then
  run sbatch "$SCRIPT"
fi
