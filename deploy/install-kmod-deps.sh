#!/usr/bin/env bash
# Installs what the kmod test layer (tests/kmod/run.sh) needs on Debian 12, as
# root: the headers of Debian's current kernel (dsvm.ko is built against them;
# the matching kernel image is fetched by the harness itself, never
# installed), QEMU to boot that kernel, busybox for the guest's initramfs, and
# the compiler with a static libc for the in-guest selftest.
# Idempotent: prints what it installs; exits 0 at once when all is present.
set -euo pipefail

packages=(
  build-essential   # make, gcc-12 (the compiler Debian's kernel was built with)
  libc6-dev         # libc.a and libpthread for the static selftest binary
  linux-headers-amd64
  qemu-system-x86
  busybox-static
  kmod              # modinfo: the module's vermagic is checked before booting
  xz-utils          # unpacks the bzImage payload to boot the ELF vmlinux
)

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for p in "${packages[@]}"; do
  installed "$p" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-kmod-deps: all ${#packages[@]} packages present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-kmod-deps: missing packages (${missing[*]}); run as root to install them" >&2
  exit 1
fi

echo "install-kmod-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
