#!/usr/bin/env bash
# Installs the Debian packages atmguard's tests and build need, when any is missing:
#   mariadb-server  - the tests start their own throwaway MariaDB server (never the system one)
#   libsystemd-dev, pkg-config - to build systemd-python (sd_notify, watchdog, journald)
#   systemd, udev, shellcheck - tests verify the unit (systemd-analyze), the udev rule and the install scripts
# As root it installs them with apt-get; otherwise it prints the exact command and fails, so
# no group of tests is ever skipped silently for want of a package.
set -euo pipefail

packages=(mariadb-server libsystemd-dev pkg-config systemd udev shellcheck)

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

command="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
if [[ $(id -u) -ne 0 ]]; then
    echo "atmguard: missing system packages: ${missing[*]}" >&2
    echo "atmguard: install them as root with:  sudo sh -c '$command'" >&2
    exit 1
fi

echo "atmguard: installing missing system packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The package's maintainer scripts may try to start the system server; tests never use it.
apt-get install -y -qq --no-install-recommends "${missing[@]}"
