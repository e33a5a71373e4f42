#!/usr/bin/env bash
# Builds the libFuzzer targets with clang in build-fuzz/, seeds their corpora
# and runs each for DSVM_FUZZ_SECONDS (default 60) seconds.
#
#   tests/fuzz/run.sh                 # from the repository root
#   DSVM_FUZZ_SECONDS=600 tests/fuzz/run.sh
#
# Prints one line per target with its executions and wall time. Exits non-zero
# when a target crashes (the reproducer lands in build-fuzz/artifacts/<target>/;
# turn it into a unit test) or the build fails. Without clang it prints SKIP
# and exits 0. Corpora persist in build-fuzz/corpus/<target> between runs.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${root}"

seconds="${DSVM_FUZZ_SECONDS:-60}"
jobs="${DSVM_BUILD_JOBS:-2}"
build="${root}/build-fuzz"
targets=(fuzz_decode_frame fuzz_decode_header fuzz_page_record)

if ! command -v clang >/dev/null 2>&1 || ! command -v clang++ >/dev/null 2>&1; then
  echo "SKIP: clang not found; libFuzzer targets need clang"
  exit 0
fi

mkdir -p "${build}"
CC=clang CXX=clang++ cmake -S . -B "${build}" -G Ninja -DDSVM_BUILD_FUZZ=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >"${build}/configure.log" 2>&1 || {
  cat "${build}/configure.log"
  echo "FAIL: cmake configure of ${build}" >&2
  exit 1
}
cmake --build "${build}" --target dsvm_fuzz_seed "${targets[@]}" -j "${jobs}"

seeds="${build}/tests/fuzz/seeds"
"${build}/tests/fuzz/dsvm_fuzz_seed" "${seeds}"

declare -A seed_dir=(
  [fuzz_decode_frame]=frames
  [fuzz_decode_header]=frames
  [fuzz_page_record]=records
)

status=0
summary=()
for t in "${targets[@]}"; do
  corpus="${build}/tests/fuzz/corpus/${t}"
  artifacts="${build}/tests/fuzz/artifacts/${t}"
  log="${build}/tests/fuzz/${t}.log"
  mkdir -p "${corpus}" "${artifacts}"
  start=$(date +%s.%N)
  rc=0
  "${build}/tests/fuzz/${t}" -max_total_time="${seconds}" -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="${artifacts}/" \
    "${corpus}" "${seeds}/${seed_dir[${t}]}" >"${log}" 2>&1 || rc=$?
  end=$(date +%s.%N)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "${log}" | tail -n 1)
  wall=$(awk -v a="${start}" -v b="${end}" 'BEGIN { printf "%.1f", b - a }')
  if [[ ${rc} -eq 0 ]]; then
    result=OK
  else
    result="CRASH (exit ${rc}; see ${log} and ${artifacts}/)"
    status=1
    tail -n 40 "${log}" >&2
  fi
  summary+=("$(printf '%-20s execs=%-12s seconds=%-7s corpus=%-6s %s' "${t}" "${execs:-?}" \
    "${wall}" "$(find "${corpus}" -type f | wc -l)" "${result}")")
done

printf '%s\n' "${summary[@]}"
exit "${status}"
