#!/usr/bin/env bash
# Installs Debian's Chromium and ChromeDriver for the dashboard's browser test
# (tests/tests/dashboard_in_a_real_browser.rs), when missing. Needs root (apt-get). Prints the
# driver's path, which the test reads from FLEET_TEST_CHROMEDRIVER.
set -euo pipefail
if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
command -v chromedriver
