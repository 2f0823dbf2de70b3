#!/usr/bin/env bash
# usage: expect-stderr.sh [--status N] [--empty] PATTERN... -- COMMAND [ARG...]
# Runs COMMAND and passes when it exits with status N (default 0) and its stderr matches every
# PATTERN (grep -E); with --empty, when its stderr is empty. stderr is collected in a file and then copied to this script's stderr, so
# `ctest --output-on-failure` shows it (after the command's stdout rather than interleaved).
# Environment for COMMAND belongs on its command line (`env VAR=value prog`), not in this
# script's environment: an LD_PRELOAD meant for the program under test must not reach bash/grep.
set -euo pipefail

want_status=0
want_empty=0
patterns=()
while (($#)); do
    case "$1" in
        --status) want_status="$2"; shift 2 ;;
        --empty) want_empty=1; shift ;;
        --) shift; break ;;
        *) patterns+=("$1"); shift ;;
    esac
done
if (($# == 0)); then
    echo "expect-stderr: no command given" >&2
    exit 2
fi

err_file="$(mktemp)"
trap 'rm -f "$err_file"' EXIT
status=0
"$@" 2>"$err_file" || status=$?
cat "$err_file" >&2

failed=0
if ((status != want_status)); then
    echo "expect-stderr: '$*' exited with status $status, want $want_status" >&2
    failed=1
fi
if ((want_empty)) && [[ -s "$err_file" ]]; then
    echo "expect-stderr: stderr of '$*' is not empty" >&2
    failed=1
fi
for pattern in "${patterns[@]}"; do
    if ! grep -Eq -- "$pattern" "$err_file"; then
        echo "expect-stderr: stderr of '$*' has no line matching: $pattern" >&2
        failed=1
    fi
done
if ((failed == 0)); then
    echo "expect-stderr: exit status $status and ${#patterns[@]} stderr patterns as expected"
fi
exit "$failed"
