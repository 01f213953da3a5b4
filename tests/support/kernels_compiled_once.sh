#!/usr/bin/env bash
# Fails when a routing kernel (routegrad::cuda::detail::forward_kernel or backward_kernel, one
# instantiation) is compiled in more than one object file of a program. nvcc compiles a kernel
# template in every .cu file that instantiates it; the programs here share their routing kernels
# through routegrad/cuda/instances.cuh's extern declarations, and a call site whose types stop
# matching those declarations would silently compile its own copy again (correct, only minutes of
# CI slower). Reads each object's defined symbols with nm; no GPU needed.
#
# Usage: kernels_compiled_once.sh NM PROGRAM OBJECT...
set -euo pipefail
nm="$1"
program="$2"
shift 2
listing=$(mktemp)
trap 'rm -f "$listing"' EXIT
for object in "$@"; do
  # "<address> t void routegrad::cuda::detail::forward_kernel<...>(...)": a kernel's host stub,
  # one per instantiation the object compiled ("[clone .cold]" parts excluded: they end in "]").
  "$nm" -C --defined-only "$object" |
    sed -nE 's/^[0-9a-f]+ [tTwW] (void routegrad::cuda::detail::(forward|backward)_kernel<.*\))$/\1/p' |
    sort -u | sed "s|^|$(basename "$object")\t|" >>"$listing"
done
kernels=$(wc -l <"$listing")
if ((kernels == 0)); then
  echo "$program: no routing kernel found in its objects (nm's output changed?): $*" >&2
  exit 1
fi
twice=$(cut -f2 "$listing" | sort | uniq -d)
if [[ -n "$twice" ]]; then
  echo "$program: $(wc -l <<<"$twice") routing kernels compiled in more than one object file;" \
    "the first ones:" >&2
  while IFS= read -r kernel; do
    files=$(awk -F'\t' -v k="$kernel" '$2 == k { printf " %s", $1 }' "$listing")
    echo "  ${kernel:0:160}... in:$files" >&2
  done < <(head -n 5 <<<"$twice")
  exit 1
fi
echo "$program: $kernels routing kernels, each compiled in one object file"
