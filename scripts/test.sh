#!/usr/bin/env bash
# Runs lantern's whole test suite. Installs what the tests need first (Debian's Fashion-MNIST
# package for the data-reader and training tests), so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  echo "installing Fashion-MNIST (apt-get install dataset-fashion-mnist)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y dataset-fashion-mnist >/dev/null; }
fi
cargo test --workspace "$@"
