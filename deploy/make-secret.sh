#!/usr/bin/env bash
# Writes a new cluster secret: 32 random bytes as 64 hex digits and a
# newline, readable by its owner only (the format ClusterSecret::Generate
# writes; any 16 to 4096 bytes are a valid secret).
# Give the same file to every dsvm-coordinator, dsvm-node and dsvmctl of the
# cluster (--secret-file FILE, or DSVM_SECRET_FILE=FILE).
#
#   deploy/make-secret.sh /etc/dsvm/secret
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 FILE" >&2
  exit 2
fi
if [ -e "$1" ]; then
  echo "make-secret: $1 exists; not overwriting a cluster's secret" >&2
  exit 1
fi
mkdir -p "$(dirname "$1")"
umask 077
set -o noclobber  # never overwrite, even a file made since the check above
{ od -An -v -tx1 -N32 /dev/urandom | tr -d ' \n'; echo; } > "$1"
echo "make-secret: wrote $1"
