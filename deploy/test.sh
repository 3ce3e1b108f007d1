#!/usr/bin/env bash
# deploy/test.sh — install everything (deploy/install.sh) and run the whole test suite.
#
# Tests run against the installed package (not the source folders), a real BuildGrid
# started by the test fixtures (deploy/buildgrid/start.sh), real bubblewrap and FUSE.
# Extra arguments go to pytest. With CI=true a test whose tool is missing fails.
set -Eeuo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$("$REPO/deploy/install.sh")"
# Install BuildGrid's own venv up front so its ~40 s shows as a step, not as a slow test.
"$REPO/deploy/buildgrid/start.sh" install
cd "$REPO"
# Type-check first (the levels are in pyproject.toml, [tool.mypy]). The source folders
# are installed under one import root, reapi_worker/<folder>, so mypy reads them through
# a tree of links with that layout (the folders are pyproject.toml's package-dir).
TYPES="$(mktemp -d)"
mkdir "$TYPES/reapi_worker"
for folder in $("$VENV/bin/python" -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]; print(" ".join(v for k, v in d.items() if k.count(".") == 1))'); do
  ln -s "$REPO/$folder" "$TYPES/reapi_worker/$folder"
done
status=0
(cd "$TYPES" && "$VENV/bin/mypy" --config-file "$REPO/pyproject.toml" --python-executable "$VENV/bin/python" -p reapi_worker) || status=$?
rm -rf "$TYPES"
[ "$status" -eq 0 ] || { echo "deploy/test.sh: mypy failed" >&2; exit "$status"; }
# Run from a directory where the source folders do not shadow anything importable.
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
