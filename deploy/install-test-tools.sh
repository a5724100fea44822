#!/usr/bin/env bash
# Install the system tools some tests drive, from Debian's packages: promtool (package
# `prometheus`) for the /metrics and alert-rule checks. `make tools` runs this and .ci/run
# runs `make tools`; with CI=true those tests fail rather than skip when a tool is absent.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool
