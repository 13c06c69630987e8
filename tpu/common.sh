# shellcheck shell=bash disable=SC2034  # its variables are read by the scripts sourcing it
# Sourced by every tpu/ script: defaults, option parsing, and `run`, which prints each
# command shell-quoted after "+ " (stdout with --dry-run, stderr otherwise) and runs it
# unless --dry-run is given. A dry run's output is a shell transcript of the real run.
set -euo pipefail

# Defaults, each overridable from the environment or by the matching flag.
TPU_NAME=${TPU_NAME:-jaxgen}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
BUCKET=${BUCKET:-}
RUN_NAME=${RUN_NAME:-}

# Layout on every TPU worker, relative to the login user's home (where ssh commands start).
REMOTE_REPO=jaxgen
REMOTE_VENV=jaxgen-venv
REMOTE_LOGS=jaxgen-logs

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
EXTRA_ARGS=()  # what follows `--`: config overrides for jaxgen.train

# Options every script accepts: "flag VARIABLE" pairs; scripts append their own.
VALUE_OPTS=("name TPU_NAME" "zone ZONE" "project PROJECT")
SWITCH_OPTS=()

usage_error() {
  printf '%s: error: %s (see --help)\n' "$(basename "$0")" "$1" >&2
  exit 2
}

# quote WORD: WORD as Python's shlex.quote writes it, so tests can shlex.split our output.
quote() {
  # Spelled out: a range such as A-Z may match more than ASCII in some locales.
  local safe='^[abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-]+$'
  local squote="'"
  if [[ $1 =~ $safe ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//$squote/\'\"\'\"\'}"
  fi
}

# quote_all WORD...: the words quoted and joined by single spaces.
quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_all "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_all "$@")" >&2
  "$@"
}

# write_file PATH CONTENT: shown as a here-document; written unless --dry-run.
write_file() {
  if ((DRY_RUN)); then
    printf "+ cat > %s <<'EOF'\n%sEOF\n" "$(quote "$1")" "$2"
    return 0
  fi
  printf '+ cat > %s\n' "$(quote "$1")" >&2
  printf '%s' "$2" >"$1"
}

_lookup() {  # _lookup FLAG "flag VAR"...: prints VAR of FLAG, fails if absent
  local flag=$1 pair
  shift
  for pair in "$@"; do
    if [[ ${pair%% *} == "$flag" ]]; then
      printf '%s' "${pair#* }"
      return 0
    fi
  done
  return 1
}

# parse_args "$@": --help, --dry-run, the declared VALUE_OPTS (--flag VALUE or
# --flag=VALUE) and SWITCH_OPTS (--flag, sets the variable to 1); `--` ends the options
# and the rest goes to EXTRA_ARGS. Anything else is a usage error (exit 2).
parse_args() {
  local arg flag value var has_value
  while (($#)); do
    arg=$1
    case $arg in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --) shift; EXTRA_ARGS=("$@"); return 0 ;;
      --*=*) flag=${arg%%=*}; value=${arg#*=}; has_value=1 ;;
      --?*) flag=$arg; value=""; has_value=0 ;;
      *) usage_error "unexpected argument '$arg'" ;;
    esac
    flag=${flag#--}
    if var=$(_lookup "$flag" ${SWITCH_OPTS[@]+"${SWITCH_OPTS[@]}"}); then
      if ((has_value)); then
        usage_error "--$flag takes no value"
      fi
      printf -v "$var" '%s' 1
      shift
    elif var=$(_lookup "$flag" "${VALUE_OPTS[@]}"); then
      if ((!has_value)); then
        if (($# < 2)) || [[ $2 == --* ]]; then
          usage_error "--$flag needs a value"
        fi
        value=$2
        shift
      fi
      printf -v "$var" '%s' "$value"
      shift
    else
      usage_error "unknown option --$flag"
    fi
  done
}

# require VAR FLAG: a usage error when VAR is empty.
require() {
  if [[ -z ${!1} ]]; then
    usage_error "missing --$2 (or set $1)"
  fi
}

# The --zone/--project flags of every gcloud call, in GCLOUD_FLAGS.
gcloud_flags() {
  require ZONE zone
  require TPU_NAME name
  GCLOUD_FLAGS=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then
    GCLOUD_FLAGS+=("--project=$PROJECT")
  fi
}

# on_workers WORKER COMMAND: run the shell COMMAND over ssh on TPU worker(s) WORKER.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" "--worker=$1" \
    "--command=$2"
}

# The run's name (logs, pid file, default workdir): --run, else the TPU's name.
run_name() {
  RUN_NAME=${RUN_NAME:-$TPU_NAME}
  if [[ ! $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]]; then
    usage_error "run name '$RUN_NAME' may hold only letters, digits, '.', '_' and '-'"
  fi
}
