#!/usr/bin/env bash
# Debian's chromium and chromedriver for the browser test of `m3d-lit app` (tests/app/test_app.py).
# Installs them only when missing and only as root; otherwise says how, and the test is skipped.
set -euo pipefail
if [[ -x /usr/bin/chromium && -e /usr/bin/chromedriver ]]; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "setup: /usr/bin/chromium or /usr/bin/chromedriver is missing and this is not root;" \
         "the browser test of m3d-lit app will be skipped. To run it:" \
         "sudo apt-get install -y chromium chromium-driver" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "setup: no apt-get here: install Chromium and ChromeDriver at /usr/bin/chromium and" \
         "/usr/bin/chromedriver to run the browser test of m3d-lit app" >&2
    exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
