#!/usr/bin/env bash
# Installs what iopf needs and the machine lacks: Debian's liburing-dev (the io_uring
# library) and pkg-config; with --dpdk also dpdk-dev, whose testpmd is the vhost-user
# back-end the test suite drives. Safe to run again; installs nothing when all is present.
# Run as root on Debian/Ubuntu. The Swift toolchain (6.1 or later) must already be there.
set -euo pipefail

need=()
if [ "${1:-}" = "--dpdk" ] && ! command -v dpdk-testpmd >/dev/null 2>&1; then
  need+=(dpdk-dev)
fi
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
if ! pkg-config --exists liburing 2>/dev/null && [ ! -f /usr/include/liburing.h ]; then
  need+=(liburing-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "iopf setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v swift >/dev/null 2>&1; then
  echo "iopf setup: no 'swift' on PATH; install a Swift 6.1+ toolchain from swift.org first" >&2
  exit 1
fi
