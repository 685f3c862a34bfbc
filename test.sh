#!/usr/bin/env bash
# Runs every test on this machine, installing first what the tests need and is missing:
#   ./test.sh            install what is missing, then `cargo test --workspace --all-targets`
#   ./test.sh setup      install only (CI runs this before its lint gates)
#   ./test.sh -- ARGS    extra arguments for cargo test (e.g. ./test.sh -- --test nbd)
# Peers the tests start on 127.0.0.1: Garage (S3), moto's server (AWS KMS API), block servers,
# the embedded KMS; clients: qemu-img, qemu-io, nbdinfo, nbdcopy, the AWS CLI.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
export PATH="$HOME/.cargo/bin:$PATH"
pip_scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
export PATH="$PATH:$pip_scripts"

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: installing $* needs root (or install it yourself and run again)" >&2
    exit 1
  fi
}

setup() {
  # Debian packages: libssl-dev and pkg-config for the openssl dev-dependency (differential XTS
  # tests), the openssl CLI (benchmarks' reference), qemu-utils (qemu-img, qemu-io) and
  # libnbd-bin (nbdinfo, nbdcopy) as the NBD clients, curl for the HTTP tests.
  local missing=()
  for pkg in pkg-config libssl-dev openssl qemu-utils libnbd-bin curl; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    need_root "${missing[*]}"
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
  fi

  # Garage, the real S3 server the S3 tests start. Building it takes ~10 minutes on 2 cores,
  # so only when it is missing.
  if ! command -v garage >/dev/null 2>&1; then
    cargo install garage --locked
  fi

  # moto's server speaks the AWS KMS API (remote-KMS tests); the AWS CLI drives the EBS APIs.
  command -v moto_server >/dev/null 2>&1 || python3 -m pip install -q 'moto[server]'
  command -v aws >/dev/null 2>&1 || python3 -m pip install -q awscli
  aws --version >/dev/null
}

setup
[ "${1:-}" = setup ] && exit 0
[ "${1:-}" = -- ] && shift
MOTO_SERVER="$(command -v moto_server)"
export MOTO_SERVER

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
