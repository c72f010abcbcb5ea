#!/usr/bin/env bash
# The frameworks' own tests with dvpo's adapters patched in (docs/integrations.md, "The frameworks'
# own tests"). Needs verl and OpenRLHF installed next to dvpo, as .ci/run installs them; fetches the
# test files of the installed versions from PyPI with pip (verl: the sdist; OpenRLHF: the wheel) into
# a work directory (a new temp dir, or --work DIR; --no-download reuses DIR/downloads), runs the ones
# that exercise the value loss, loss aggregation, GAE and the data metrics twice (as shipped, and with
# tests/upstream/dvpo_patch_conftest.py as their conftest.py), and exits 1 on any test that passes as
# shipped but not with dvpo, or on an upstream file whose patched run never called dvpo's code.
#
#   tools/upstream_tests.sh [--work DIR] [--framework verl|openrlhf] [--no-download]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tests/upstream/run_upstream.py "$@"
