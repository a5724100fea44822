#!/usr/bin/env bash
# Install promtool (Debian package `prometheus`) for the suite's `promtool check` tests.
# .ci/run calls this; with CI=true those tests fail rather than skip when promtool is absent.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool
