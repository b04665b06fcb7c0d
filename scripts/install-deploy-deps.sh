#!/usr/bin/env bash
# Real nginx and Prometheus (Debian packages) for tests/test_deploy.py, which starts them on
# loopback itself, and Debian's chromium + chromium-driver for tests/test_page.py (the page at
# / in headless Chromium, driven by Selenium; scripts/page_screenshot.py). Package install
# scripts must not start the system services (port 80/9090), so a policy-rc.d that forbids
# service starts is in place during the install.
set -euo pipefail
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  created=1
fi
trap '[ "$created" -eq 1 ] && $SUDO rm -f "$policy"' EXIT
$SUDO apt-get -o Acquire::Retries=3 update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o Acquire::Retries=3 install -y -qq --no-install-recommends "${need[@]}"
