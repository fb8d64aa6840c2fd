#!/usr/bin/env bash
# Debian appliance install, run by `provisioning/install.sh --system` (as root) after it has built the
# /opt/aziza/venv virtual environment. Safe to re-run: every step checks before it changes anything, and
# existing configuration (/etc/aziza/*) is never overwritten.
#
#   AZIZA_DB_NAME   database name   (default aziza)
#   AZIZA_DB_USER   database role   (default aziza; reached over the Unix socket with peer authentication,
#                   so it must equal the system user aziza unless pg_ident maps it)
#   AZIZA_NO_START  set to 1 to enable the units without starting them
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "system_install.sh: run as root" >&2
  exit 1
fi

DB_NAME=${AZIZA_DB_NAME:-aziza}
DB_USER=${AZIZA_DB_USER:-aziza}
VENV=/opt/aziza/venv
ETC=/etc/aziza
DATA=/var/lib/aziza
SHARE=/usr/share/aziza

log() { printf 'system_install: %s\n' "$*"; }

# Names go into SQL below: allow only plain identifiers.
for name in "$DB_NAME" "$DB_USER"; do
  if ! [[ "$name" =~ ^[a-z_][a-z0-9_]{0,62}$ ]]; then
    echo "system_install.sh: invalid database identifier: $name" >&2
    exit 2
  fi
done

log "installing Debian packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q postgresql redis-server

log "creating user aziza and directories"
if ! id -u aziza >/dev/null 2>&1; then
  adduser --system --group --home "$DATA" --no-create-home --shell /usr/sbin/nologin aziza
fi
for group in video render; do
  if getent group "$group" >/dev/null; then usermod -a -G "$group" aziza; fi
done
install -d -o root -g aziza -m 0750 "$ETC"
install -d -o aziza -g aziza -m 0750 "$DATA" "$DATA/voices" "$DATA/models"
install -d -o root -g root -m 0755 "$SHARE"
rm -rf "$SHARE/asterisk_conf"
cp -r asterisk_conf "$SHARE/asterisk_conf"

if [ ! -f "$ETC/aziza.toml" ]; then
  MEDIA_WORKERS=$(nproc 2>/dev/null || echo 1)
  log "writing $ETC/aziza.toml (defaults; see docs/configuration.md)"
  install -o root -g aziza -m 0640 /dev/null "$ETC/aziza.toml"
  cat >"$ETC/aziza.toml" <<TOML
# Aziza appliance configuration. Every field and its default: docs/configuration.md.
# Environment variables (AZIZA_*, e.g. in /etc/aziza/aziza.env) override this file.
# Unix socket + peer authentication: the aziza system user is the ${DB_USER} role, no password to keep.
database_url = "postgresql://${DB_USER}@/${DB_NAME}?host=/var/run/postgresql"
redis_url = "redis://127.0.0.1:6379/0"
data_dir = "${DATA}"

[engine]
backend = "echo"        # "moshi" once weights are in place (engine.model)
num_slots = 10

[bridge]
media_workers = ${MEDIA_WORKERS}   # calls' media in this many processes: one per core (docs/configuration.md)

[capacity]
slots = 10

[ari]
username = "aziza"
password = "$(head -c 18 /dev/urandom | base64 | tr -d '/+=')"
TOML
fi
if [ ! -f "$ETC/control.token" ]; then
  # The control API's bearer token: the bridge (group aziza) and aziza-admin (root, group aziza) read it;
  # it also keys browser talk links (aziza-admin talk-link). Rotate: aziza-admin control-token --rotate.
  log "writing $ETC/control.token (control API token, root:aziza 0640)"
  install -o root -g aziza -m 0640 /dev/null "$ETC/control.token"
  head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$ETC/control.token"
fi
if [ ! -f "$ETC/aziza.env" ]; then
  install -o root -g aziza -m 0640 /dev/null "$ETC/aziza.env"
  printf '# Environment for aziza-engine and aziza-bridge (AZIZA_* overrides aziza.toml).\n' >"$ETC/aziza.env"
fi

log "starting PostgreSQL and Redis"
systemctl enable --now postgresql redis-server

log "creating database role ${DB_USER} and database ${DB_NAME}"
psql_admin() { runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qAt "$@"; }
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '${DB_USER}'")" != "1" ]; then
  psql_admin -c "CREATE ROLE ${DB_USER} LOGIN"
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '${DB_NAME}'")" != "1" ]; then
  psql_admin -c "CREATE DATABASE ${DB_NAME} OWNER ${DB_USER}"
fi

log "applying database migrations"
runuser -u aziza -- env AZIZA_CONFIG="$ETC/aziza.toml" "$VENV/bin/aziza-admin" db migrate

log "installing systemd units"
install -o root -g root -m 0644 systemd/aziza-engine.service systemd/aziza-engine@.service \
  systemd/aziza-bridge.service systemd/aziza.target \
  /etc/systemd/system/
systemctl daemon-reload
systemctl enable aziza.target aziza-engine.service aziza-bridge.service
if [ "${AZIZA_NO_START:-0}" != 1 ]; then
  systemctl start aziza.target
fi

log "done. Next: aziza-admin persona create ..., aziza-admin did add ..., aziza-admin provision asterisk"
