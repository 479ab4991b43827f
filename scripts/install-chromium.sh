#!/bin/sh
# Headless Chromium for the HTML report test (tests/test_report_browser.py).
# Idempotent: does nothing when /usr/bin/chromium is already there.
# Needs root (or sudo) on Debian/Ubuntu; elsewhere install Chromium yourself.
set -eu

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium.sh: no apt-get here; install Chromium yourself (the browser test skips without it unless CI is set)" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-chromium.sh: not root and no sudo; run as root: apt-get update && apt-get install -y chromium" >&2
        exit 0
    fi
fi
echo "install-chromium.sh: installing Debian's chromium package"
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium
