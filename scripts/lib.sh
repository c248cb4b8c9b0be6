# Shared by scripts/run and scripts/test: install what a fresh Debian/Ubuntu machine lacks.
# Sourced, not executed.

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

have_postgres_server() {
  command -v initdb >/dev/null 2>&1 && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

# PostgreSQL server binaries, for the embedded cluster and the test harness.
# Debian's package would also create and start a system-wide cluster; Lifeboat runs its
# own private clusters, so that one is switched off before installing.
ensure_postgres() {
  if have_postgres_server; then return 0; fi
  echo "==> installing PostgreSQL (Debian package postgresql)"
  as_root mkdir -p /etc/postgresql-common
  if [ ! -f /etc/postgresql-common/createcluster.conf ]; then
    echo "create_main_cluster = false" | as_root tee /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  apt_install -o Dpkg::Options::=--force-confold postgresql
}

# A local S3-compatible server (moto, from PyPI) for the storage conformance suite.
ensure_moto() {
  if python3 -c 'import moto.server' >/dev/null 2>&1; then return 0; fi
  echo "==> installing moto[server] (local S3-compatible server for the tests)"
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]'
}

# Prometheus, promtool, Alertmanager and amtool (Debian packages), for the alert-rule
# tests and the end-to-end monitoring tests. Their services are not started: policy-rc.d
# refuses service starts during the install.
ensure_prometheus() {
  if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 \
    && command -v prometheus-alertmanager >/dev/null 2>&1 && command -v amtool >/dev/null 2>&1; then
    return 0
  fi
  echo "==> installing prometheus and prometheus-alertmanager (Debian packages)"
  local policy=/usr/sbin/policy-rc.d
  local had_policy=""
  [ -e "$policy" ] && had_policy=1
  [ -n "$had_policy" ] || printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
  as_root chmod +x "$policy"
  apt_install prometheus prometheus-alertmanager
  [ -n "$had_policy" ] || as_root rm -f "$policy"
}

# pymobiledevice3 (PyPI) in its own virtualenv: the third host the virtual iPhone must
# satisfy; iphone_backup_decrypt (PyPI) beside it, the reader that proves an encrypted
# backup opens as a phone's does. Tests find them through PYMOBILEDEVICE3 and
# BACKUP_DECRYPT_PYTHON (exported here) or on PATH.
ensure_pymobiledevice3() {
  local venv="${LIFEBOAT_TOOLS_VENV:-$HOME/.cache/lifeboat/pymobiledevice3-venv}"
  if [ ! -x "$venv/bin/pymobiledevice3" ]; then
    echo "==> installing pymobiledevice3 (PyPI) into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'pymobiledevice3>=11,<12'
  fi
  if ! "$venv/bin/python" -c 'import iphone_backup_decrypt' 2>/dev/null; then
    echo "==> installing iphone_backup_decrypt (PyPI) into $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'iphone_backup_decrypt>=0.9,<1'
  fi
  if ! "$venv/bin/python" -c 'import typedstream' 2>/dev/null; then
    echo "==> installing pytypedstream (PyPI, iLEAPP's attributedBody decoder) into $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'pytypedstream>=0.1,<0.2'
  fi
  export PYMOBILEDEVICE3="$venv/bin/pymobiledevice3"
  export BACKUP_DECRYPT_PYTHON="$venv/bin/python"
}

# libimobiledevice's host tools (idevice_id, idevicebackup2): real peers for the virtual iPhone.
ensure_libimobiledevice() {
  if command -v idevice_id >/dev/null 2>&1; then return 0; fi
  echo "==> installing libimobiledevice-utils (Debian package)"
  apt_install libimobiledevice-utils
}

# util-linux's fincore: the ingest test asks it whether written packs left the page cache.
ensure_fincore() {
  if command -v fincore >/dev/null 2>&1; then return 0; fi
  echo "==> installing util-linux-extra (Debian package, for fincore)"
  apt_install util-linux-extra
}

# Debian's chromium and its matching chromedriver: the console's tests drive a real browser.
ensure_chromium() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then return 0; fi
  echo "==> installing chromium and chromium-driver (Debian packages, for the console's browser tests)"
  apt_install chromium chromium-driver
}
