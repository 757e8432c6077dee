#!/usr/bin/env bash
# The whole test suite, in its own environment. Extra arguments go to pytest,
# e.g. `scripts/test.sh -m "not slow"` to skip the multi-node tests.
source "$(dirname "$0")/env.sh"
exec python -m pytest "$@"
