#!/usr/bin/env bash
# deploy/install.sh — install everything reapi-worker needs on a fresh Debian 12 machine.
#
# System packages (only those missing; needs root): bubblewrap, fuse3, libfuse3-dev and
# pkg-config (to build pyfuse3), a C compiler and Python headers, python3-venv,
# postgresql (BuildGrid 0.4.4 only runs on PostgreSQL), iproute2 (multi-host tests, and
# network=on actions), slirp4netns (outbound NAT of network=on actions),
# bazel-bootstrap (a real REAPI client for the system tests), systemd (systemd-analyze
# checks the unit in deploy/systemd/), busybox-static (a sysroot for chroot-mode tests and
# the BuildStream system test).
# Python: the project and its test extras in a venv of its own, $REAPI_VENV (default
# <repo>/.venv), so the system Python stays untouched (Debian marks it externally managed).
#
# Idempotent: a second run installs nothing new. Prints the venv path on stdout.
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REAPI_VENV:-$REPO/.venv}"
log() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }
# shellcheck source=lib/python.sh
. "$REPO/deploy/lib/python.sh"

# Debian package -> a file whose presence shows it is installed.
declare -A PKG_MARKERS=(
  [bubblewrap]=/usr/bin/bwrap
  [fuse3]=/usr/bin/fusermount3
  [libfuse3-dev]=/usr/include/fuse3/fuse.h
  [pkg-config]=/usr/bin/pkg-config
  [gcc]=/usr/bin/gcc
  [python3-dev]=/usr/include/python3.11/Python.h
  [python3-venv]=/usr/lib/python3.11/ensurepip/__init__.py
  [postgresql]=/usr/lib/postgresql
  [iproute2]=/usr/sbin/ip
  [slirp4netns]=/usr/bin/slirp4netns
  [procps]=/usr/bin/pgrep
  [bazel-bootstrap]=/usr/bin/bazel
  # Not /bin/busybox: Debian's dynamically linked `busybox` ships that path too.
  [busybox-static]=/var/lib/dpkg/info/busybox-static.list
  [systemd]=/usr/bin/systemd-analyze
)

missing=()
for pkg in "${!PKG_MARKERS[@]}"; do
  [ -e "${PKG_MARKERS[$pkg]}" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]} (run as root, or install them first)"
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get on this machine"
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

PYTHON="$(find_python "${REAPI_PYTHON:-}")" || PYTHON=""
[ -n "$PYTHON" ] || die "no Python >= 3.11 found"

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
# Only reinstall when the project's sources changed (keeps repeated test runs fast).
if [ ! -f "$VENV/.installed" ] || [ -n "$(cd "$REPO" && find pyproject.toml host protos storage sandbox worker -newer "$VENV/.installed" -print -quit)" ]; then
  log "pip install $REPO[test] into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip setuptools >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$REPO[test]" >&2
  touch "$VENV/.installed"
fi
echo "$VENV"
