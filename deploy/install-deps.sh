#!/usr/bin/env bash
# Installs everything dsvm needs to build and test on Debian 12, as root.
# Idempotent: packages already present are left alone and no work is redone.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libucx-dev ucx-utils librdmacm-dev libibverbs-dev
  libboost-dev librocksdb-dev libssl-dev
  libgtest-dev libgmock-dev googletest
  clang
  iproute2
  openmpi-bin libopenmpi-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages (${missing[*]}); run as root to install them" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
