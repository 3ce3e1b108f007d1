#!/usr/bin/env bash
# deploy/test.sh — install everything (deploy/install.sh) and run the whole test suite.
#
# Tests run against the installed package (not the source folders), a real BuildGrid
# started by the test fixtures (deploy/buildgrid/start.sh), real bubblewrap and FUSE.
# Extra arguments go to pytest. With CI=true a test whose tool is missing fails.
set -Eeuo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$("$REPO/deploy/install.sh")"
# Install BuildGrid's own venv up front so its ~40 s shows as a step, not as a slow test;
# likewise BuildStream's (a client of the system tests, in a venv of its own).
"$REPO/deploy/buildgrid/start.sh" install
"$REPO/deploy/buildstream/install.sh" >/dev/null
cd "$REPO"
# Run from a directory where the source folders do not shadow anything importable.
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
