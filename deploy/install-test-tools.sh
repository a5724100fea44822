#!/usr/bin/env bash
# Install the system tools some tests drive, from Debian's packages: promtool (package
# `prometheus`) for the /metrics and alert-rule checks, and `chromium` for the browser tests
# (tests/browser, driven headless over the DevTools protocol; nothing is downloaded at run
# time). `make tools` runs this and .ci/run runs `make tools`; with CI=true those tests fail
# rather than skip when a tool is absent.
set -euo pipefail
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
command -v promtool
command -v chromium
