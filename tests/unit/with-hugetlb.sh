#!/usr/bin/env bash
# Runs a test command with hugetlb pages reserved for it: raises
# vm.nr_hugepages by DSVM_HUGETLB_PAGES (default 16, 32 MiB) and puts the
# old value back on exit. Sets DSVM_REQUIRE_HUGETLB when they were
# reserved, so a test that needs them fails instead of skipping. Without
# root, or when the kernel cannot reserve them all, the command runs as
# it is and its hugetlb tests skip, saying why. CTest runs it alone
# (RUN_SERIAL): while the pages are reserved, any 2 MiB region gets them.
set -u
want=${DSVM_HUGETLB_PAGES:-16}
knob=/proc/sys/vm/nr_hugepages
old=$(cat "$knob" 2> /dev/null || true)
if [ -n "$old" ] && [ -w "$knob" ] && echo $((old + want)) 2> /dev/null > "$knob"; then
  trap 'echo "$old" > "$knob"' EXIT
  got=$(cat "$knob")
  if [ "$got" -ge $((old + want)) ]; then
    export DSVM_REQUIRE_HUGETLB=1
  else
    echo "with-hugetlb: the kernel reserved $((got - old)) of $want hugetlb pages; their tests may skip"
  fi
else
  echo "with-hugetlb: cannot raise $knob (not root?); hugetlb tests skip"
fi
"$@"
