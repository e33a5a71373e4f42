#!/usr/bin/env bash
# Runs a test command with hugetlb pages reserved for it: raises
# vm.nr_hugepages by DSVM_HUGETLB_PAGES (default 16, 32 MiB) and puts the
# old value back on exit. Sets DSVM_REQUIRE_HUGETLB when they were
# reserved, so a test that needs them fails instead of skipping. Without
# root, or when the kernel cannot reserve them all, the command runs as
# it is and its hugetlb tests skip; the script then says "SKIP: ...",
# which CTest reports as a skip. CTest runs it alone (RUN_SERIAL): while
# the pages are reserved, any 2 MiB region gets them. The command runs
# under `timeout` (DSVM_HUGETLB_SECONDS, default 100, below CTest's own
# limit) so that the old value is always put back.
set -u
want=${DSVM_HUGETLB_PAGES:-16}
knob=/proc/sys/vm/nr_hugepages
old=$(cat "$knob" 2> /dev/null || true)
skip=""
if [ -n "$old" ] && [ -w "$knob" ] && echo $((old + want)) 2> /dev/null > "$knob"; then
  trap 'echo "$old" > "$knob"' EXIT
  trap 'exit 130' INT TERM
  got=$(cat "$knob")
  if [ "$got" -ge $((old + want)) ]; then
    export DSVM_REQUIRE_HUGETLB=1
  else
    skip="the kernel reserved $((got - old)) of $want hugetlb pages"
  fi
else
  skip="cannot raise $knob (not root?)"
fi
timeout "${DSVM_HUGETLB_SECONDS:-100}" "$@"
rc=$?
if [ -n "$skip" ] && [ "$rc" -eq 0 ]; then echo "SKIP: $skip; the hugetlb tests skipped"; fi
exit "$rc"
