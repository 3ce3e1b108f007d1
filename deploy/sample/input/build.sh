#!/bin/sh
# The local farm's sample action: reads its inputs, writes one output, says where it ran.
set -eu
mkdir -p out
{
  echo "words in the inputs: $(cat src/*.txt | wc -w)"
  echo "shouted: $(tr 'a-z' 'A-Z' < src/greeting.txt)"
  echo "ran as uid $(id -u) in $(pwd) on $(uname -s) $(uname -m)"
} > out/report.txt
echo "sample action done"
