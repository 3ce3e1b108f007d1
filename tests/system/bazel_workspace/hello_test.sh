#!/bin/sh
# The binary, built remotely, run remotely by the test action.
out="$("$TEST_SRCDIR/$TEST_WORKSPACE/hello")"
[ "$out" = "hello, farm" ] || { echo "unexpected output: $out"; exit 1; }
