#!/usr/bin/env bash
# Install jaxgen on every worker of a TPU VM or pod slice.
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: tpu/setup.sh [options]

Install jaxgen on every worker (--worker=all) of the TPU NAME: the code in
~/jaxgen, and a virtual environment ~/jaxgen-venv holding jax[tpu] and jaxgen
(editable, with the tfds extra). jaxgen needs Python >= 3.11 and the TPU images
ship 3.10, so the environment's Python comes from uv. Safe to run again: it
replaces both folders.

The code comes from --repo (git clone on each worker) or, by default, from this
checkout: `git archive` of --ref (default HEAD; uncommitted changes are left
out), copied to every worker with scp.

options (environment variable in brackets):
  --name NAME         TPU name [TPU_NAME, default jaxgen]
  --zone ZONE         zone [ZONE, default us-central2-b]
  --project PROJECT   project [PROJECT, default: gcloud's configured one]
  --repo URL          git URL to clone on the workers [JAXGEN_REPO]
  --ref REF           commit, branch or tag to install [JAXGEN_REF]
  --python VERSION    Python version of the environment [PYTHON_VERSION, default 3.12]
  --tfds-data GCS     also copy a TFDS data dir from the bucket to ~/tensorflow_datasets
                      on every worker, e.g. gs://BUCKET/tensorflow_datasets (the
                      array_record files TFDS reads must be on a local disk)
  --dry-run           print the commands, run nothing
  -h, --help          this help
EOF
}

REPO_URL=${JAXGEN_REPO:-}
REF=${JAXGEN_REF:-}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
TFDS_DATA=""
VALUE_OPTS+=("repo REPO_URL" "ref REF" "python PYTHON_VERSION" "tfds-data TFDS_DATA")
parse_args "$@"
if ((${#EXTRA_ARGS[@]})); then
  usage_error "unexpected arguments after --"
fi
require PYTHON_VERSION python
if [[ -n $TFDS_DATA && $TFDS_DATA != gs://* ]]; then
  usage_error "--tfds-data must be a gs:// path, got '$TFDS_DATA'"
fi
gcloud_flags

if [[ -n $REPO_URL ]]; then
  fetch="rm -rf $REMOTE_REPO && git clone --quiet $(quote "$REPO_URL") $REMOTE_REPO"
  if [[ -n $REF ]]; then
    fetch+=" && git -C $REMOTE_REPO checkout --quiet $(quote "$REF")"
  fi
else
  tarball="${TMPDIR:-/tmp}/jaxgen-$TPU_NAME.tar.gz"
  run git -C "$REPO_ROOT" archive --format=tar.gz "--output=$tarball" "${REF:-HEAD}"
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:jaxgen.tar.gz" \
    "${GCLOUD_FLAGS[@]}" --worker=all
  fetch="rm -rf $REMOTE_REPO && mkdir $REMOTE_REPO && tar -xzf jaxgen.tar.gz -C $REMOTE_REPO"
fi
install="python3 -m pip install --quiet --user --upgrade uv"
install+=" && rm -rf $REMOTE_VENV"
install+=" && python3 -m uv venv --quiet --python $(quote "$PYTHON_VERSION") $REMOTE_VENV"
install+=" && python3 -m uv pip install --quiet --python $REMOTE_VENV/bin/python"
install+=" -e './${REMOTE_REPO}[tfds,gcs]' 'jax[tpu]'"
command="$fetch && $install"
if [[ -n $TFDS_DATA ]]; then
  command+=" && mkdir -p tensorflow_datasets"
  command+=" && gcloud storage rsync --recursive $(quote "$TFDS_DATA") tensorflow_datasets"
fi
on_workers all "$command"
