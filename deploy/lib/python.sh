# Sourced by the deploy scripts: the one rule for which Python they build venvs with.
#
# find_python [OVERRIDE]: print the first of OVERRIDE (an operator's choice, if given),
# python3.11, python3 that runs and is >= 3.11; return 1 if none is. An override that is
# too old is passed over, not obeyed: a venv built on it would fail later and less clearly.
find_python() {
  local candidate
  for candidate in ${1:-} python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
