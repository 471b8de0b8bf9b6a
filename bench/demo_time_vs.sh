#!/usr/bin/env bash
# `make demo` cold on fresh clones of two revisions, one after the other in the same period, as a
# new user runs it (a fresh virtual environment, an empty testbed cache): the wall time of each.
# Usage, from the project root: bash bench/demo_time_vs.sh OLD_REV [NEW_REV (default HEAD)]
set -u
top=$(git rev-parse --show-toplevel) || exit 1
shared=$(cd "$top/../shared" && pwd) || { echo "no ../shared beside the project"; exit 1; }
for rev in "$1" "${2:-HEAD}"; do
  commit=$(git -C "$top" rev-parse --short "$rev") || exit 1
  d=$(mktemp -d)
  ln -s "$shared" "$d/shared"
  git clone -q "$top" "$d/project" && git -C "$d/project" checkout -q "$commit"
  start=$(date +%s.%N)
  (cd "$d/project" && QTUNE_CACHE="$d/cache" make demo > "$d/demo.log" 2>&1); rc=$?
  echo "$commit rc=$rc $(echo "$(date +%s.%N) - $start" | bc) s"
  [ $rc -eq 0 ] || tail -20 "$d/demo.log"
  rm -rf "$d"
done
