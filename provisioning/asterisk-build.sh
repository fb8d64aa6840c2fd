#!/usr/bin/env bash
# Build and install Asterisk 22 from source on Debian (Debian 12 ships no asterisk package).
#
#   provisioning/asterisk-build.sh ASTERISK_TARBALL PJPROJECT_TARBALL [--prefix DIR] [--no-service]
#
#   ASTERISK_TARBALL   asterisk-22.x.y.tar.gz as downloaded from downloads.asterisk.org
#   PJPROJECT_TARBALL  the pjproject tarball that Asterisk version bundles (third-party/versions.mak);
#                      it is used as is, nothing is downloaded
#   --prefix DIR       where to install (default /usr: /usr/sbin/asterisk, /etc/asterisk, /var/lib/asterisk)
#   --no-service       skip the system setup (user `asterisk`, default asterisk.conf/modules.conf/logger.conf,
#                      systemd unit): a private build, as the tests use
#
# Only the modules the appliance needs are built (ARI/Stasis, PJSIP, externalMedia RTP, the dialplan,
# mixing bridges, music on hold, G.711/G.722). Sounds and music on hold come from Debian's packages
# asterisk-core-sounds-en-wav and asterisk-moh-opsound-wav. A finished build is kept in
# $AZIZA_ASTERISK_CACHE (default /var/cache/aziza/asterisk) under a key made of the two tarballs' sha256,
# this recipe and the prefix: the same inputs install from the cache in seconds, and running again on an
# installed prefix does nothing. JOBS (default: number of CPUs) sets make's parallelism.
set -euo pipefail

say() { printf 'asterisk-build: %s\n' "$*"; }
die() { printf 'asterisk-build: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

# ---- arguments ------------------------------------------------------------------------------------
PREFIX=/usr SERVICE=1
positional=()
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
    --prefix=*) PREFIX=${1#--prefix=}; shift ;;
    --no-service) SERVICE=0; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) positional+=("$1"); shift ;;
  esac
done
[ ${#positional[@]} -eq 2 ] || { usage >&2; exit 2; }
AST_TAR=${positional[0]} PJ_TAR=${positional[1]}
case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path, not '$PREFIX'" ;; esac
PREFIX=${PREFIX%/}; [ -n "$PREFIX" ] || die "--prefix / is not supported; use /usr"
if [ "$SERVICE" = 1 ] && [ "$(id -u)" != 0 ]; then
  die "the system setup (user asterisk, asterisk.service) needs root; or pass --no-service"
fi
SYSTEMD_DIR=${AZIZA_SYSTEMD_DIR:-/etc/systemd/system}

for tarball in "$AST_TAR" "$PJ_TAR"; do
  [ -e "$tarball" ] || die "tarball not found: $tarball"
  if [ ! -f "$tarball" ] || [ ! -r "$tarball" ]; then die "tarball not readable: $tarball"; fi
done
AST_TAR=$(realpath "$AST_TAR") PJ_TAR=$(realpath "$PJ_TAR")
# Listing the tarball proves it is one (a truncated download fails here, not 5 minutes into the build).
ast_top=$(tar -tzf "$AST_TAR" 2>/dev/null | head -n1 | cut -d/ -f1) || true
[[ "$ast_top" =~ ^asterisk-2[2-9]\.[0-9]+ ]] \
  || die "not an Asterisk 22+ source tarball (gzip, top folder asterisk-2x.y.z/): $AST_TAR"
tar -tjf "$PJ_TAR" >/dev/null 2>&1 || die "not a readable bzip2 tarball: $PJ_TAR"
pj_name=$(basename "$PJ_TAR")
[[ "$pj_name" =~ ^pjproject-[0-9.]+\.tar\.bz2$ ]] \
  || die "the pjproject tarball must keep its release name (pjproject-X.Y.tar.bz2), not $pj_name"

# ---- the recipe (part of the cache key) -----------------------------------------------------------
RECIPE_VERSION=1
# What the appliance uses; their module dependencies are added from menuselect-tree.
MODULES=(
  app_stasis app_dial app_playback app_echo app_stack
  bridge_simple bridge_softmix bridge_native_rtp bridge_holding bridge_builtin_features
  chan_pjsip chan_rtp chan_bridge_media
  codec_ulaw codec_alaw codec_a_mu codec_g722 codec_resample
  format_wav format_pcm format_sln
  func_channel func_callerid func_logic func_strings func_dialplan func_hangupcause
  pbx_config
  res_ari res_ari_model res_ari_applications res_ari_asterisk res_ari_bridges res_ari_channels
  res_ari_device_states res_ari_endpoints res_ari_events res_ari_playbacks res_ari_recordings
  res_ari_sounds
  res_stasis res_stasis_answer res_stasis_device_state res_stasis_playback res_stasis_recording
  res_stasis_snoop
  res_http_websocket res_rtp_asterisk res_musiconhold res_timing_timerfd res_clioriginate
  res_sorcery_config res_sorcery_memory res_sorcery_memory_cache res_sorcery_astdb
  res_pjproject res_pjsip res_pjsip_session res_pjsip_sdp_rtp res_pjsip_caller_id res_pjsip_nat
  res_pjsip_endpoint_identifier_ip res_pjsip_endpoint_identifier_user res_pjsip_authenticator_digest
  res_pjsip_outbound_authenticator_digest res_pjsip_registrar res_pjsip_outbound_registration
  res_pjsip_rfc3326 res_pjsip_diversion res_pjsip_dtmf_info res_pjsip_header_funcs res_pjsip_logger
  res_pjsip_acl res_pjsip_dlg_options res_pjsip_path res_pjsip_refer res_pjsip_pubsub
)
# Categories switched off before the modules above are switched on (the sound categories are downloads).
OFF_CATEGORIES=(MENUSELECT_ADDONS MENUSELECT_APPS MENUSELECT_BRIDGES MENUSELECT_CDR MENUSELECT_CEL
  MENUSELECT_CHANNELS MENUSELECT_CODECS MENUSELECT_FORMATS MENUSELECT_FUNCS MENUSELECT_PBX MENUSELECT_RES
  MENUSELECT_TESTS MENUSELECT_UTILS MENUSELECT_AGIS MENUSELECT_CORE_SOUNDS MENUSELECT_MOH
  MENUSELECT_EXTRA_SOUNDS)
CONFIGURE_FLAGS=(--with-pjproject-bundled --without-libjwt)
BUILD_DEPS=(build-essential libedit-dev uuid-dev libjansson-dev libxml2-dev libsqlite3-dev libssl-dev
  libsrtp2-dev libncurses-dev pkg-config bzip2)
SOUND_DEPS=(asterisk-core-sounds-en-wav asterisk-moh-opsound-wav)

sha() { sha256sum "$1" | cut -c1-64; }
AST_SHA=$(sha "$AST_TAR") PJ_SHA=$(sha "$PJ_TAR")
recipe_sha=$(printf '%s\n' "$RECIPE_VERSION" "${MODULES[*]}" "${OFF_CATEGORIES[*]}" \
  "${CONFIGURE_FLAGS[*]}" "$PREFIX" | sha256sum | cut -c1-12)
KEY="${ast_top}-${AST_SHA:0:12}-${PJ_SHA:0:12}-${recipe_sha}"
CACHE=${AZIZA_ASTERISK_CACHE:-/var/cache/aziza/asterisk}
ARCHIVE="$CACHE/$KEY.tar.gz"
MARKER="$PREFIX/share/aziza/asterisk-build"
ASTERISK_BIN="$PREFIX/sbin/asterisk"

missing_packages() {
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || printf '%s ' "$pkg"
  done
}

ensure_packages() {  # ensure_packages WHAT PKG...
  local what=$1; shift
  local missing
  missing=$(missing_packages "$@")
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" != 0 ]; then
    die "missing $what packages; as root run: apt-get install -y $missing"
  fi
  say "installing $what packages: $missing"
  # shellcheck disable=SC2086  # a list of package names
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null; } \
    || die "apt-get could not install: $missing"
}

mkdir -p "$CACHE" || die "cannot create the cache folder $CACHE"
# Whatever fails, the half-built tree and a half-written archive go; the build log stays.
WORK=""
trap '[ -z "$WORK" ] || rm -rf "$WORK"; rm -f "$ARCHIVE.tmp"' EXIT
trap 'exit 130' INT TERM
# One build per cache at a time (CI and an operator may run this together).
exec 9>"$CACHE/.lock"
flock 9

# ---- already installed? ---------------------------------------------------------------------------
if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$KEY" ] && [ -x "$ASTERISK_BIN" ]; then
  say "$ast_top is already installed in $PREFIX ($("$ASTERISK_BIN" -V)); nothing to do"
  INSTALLED=1
else
  INSTALLED=0
fi

# ---- build (cache miss) ---------------------------------------------------------------------------
build() {
  ensure_packages build "${BUILD_DEPS[@]}"
  local log jobs started
  WORK=$(mktemp -d "$CACHE/build-$KEY.XXXXXX")
  local work=$WORK
  log="$CACHE/$KEY.build.log"
  : >"$log"
  jobs=${JOBS:-$(nproc)}
  started=$(date +%s)
  step() {  # step NAME COMMAND...: run with output in the log; a failure names the step and the log
    local name=$1; shift
    say "$name ($(($(date +%s) - started)) s so far)"
    printf '\n==== %s: %s\n' "$name" "$*" >>"$log"
    "$@" >>"$log" 2>&1 || die "build failed at '$name'; log: $log (last lines: $(tail -n 3 "$log" | tr '\n' ' '))"
  }
  say "building $ast_top with pjproject $pj_name for $PREFIX (about 15 min on 2 busy cores, 6 idle); log: $log"
  mkdir -p "$work/externals"
  cp "$PJ_TAR" "$work/externals/"
  step "unpacking" tar -xzf "$AST_TAR" -C "$work"
  local src="$work/$ast_top"
  cd "$src"
  step "configure" ./configure --prefix="$PREFIX" "${CONFIGURE_FLAGS[@]}" \
    --with-externals-cache="$work/externals"
  step "menuselect" make menuselect/menuselect menuselect-tree menuselect.makeopts
  # One option per menuselect call: combined options were silently ignored (measured), and an unknown
  # name makes it exit 1 without writing anything, which `step` turns into a failure naming it.
  local category module
  for category in "${OFF_CATEGORIES[@]}"; do
    step "menuselect: disable $category" menuselect/menuselect --disable-category "$category" menuselect.makeopts
  done
  step "menuselect: disable BUILD_NATIVE" menuselect/menuselect --disable BUILD_NATIVE menuselect.makeopts
  for module in $(module_closure menuselect-tree "${MODULES[@]}"); do
    step "menuselect: enable $module" menuselect/menuselect --enable "$module" menuselect.makeopts
  done
  step "menuselect: check dependencies" menuselect/menuselect --check-deps menuselect.makeopts
  step "make -j$jobs" make -j"$jobs"
  local stage="$work/stage"
  step "make install" make install DESTDIR="$stage"
  for module in "${MODULES[@]}"; do
    [ -f "$stage$PREFIX/lib/asterisk/modules/$module.so" ] \
      || die "build failed: module $module was not built (its dependencies?); log: $log"
  done
  mkdir -p "$stage$(dirname "$MARKER")"
  printf '%s\n' "$KEY" >"$stage$MARKER"
  chmod 755 "$stage"
  step "archiving into the cache" tar -C "$stage" -czf "$ARCHIVE.tmp" .
  mv -f "$ARCHIVE.tmp" "$ARCHIVE"
  cd /
  rm -rf "$WORK"; WORK=""
  say "built in $(($(date +%s) - started)) s; cached as $ARCHIVE"
}

# Names of MODULES plus every module they depend on (transitively), from menuselect-tree.
module_closure() {
  local tree=$1; shift
  awk -v want="$*" '
    /<member name="/ { match($0, /name="[^"]+"/); cur = substr($0, RSTART + 6, RLENGTH - 7); known[cur] = 1 }
    /<depend type="module">/ { d = $0; sub(/.*<depend type="module">/, "", d); sub(/<.*/, "", d); dep[cur] = dep[cur] " " d }
    END {
      n = split(want, queue, " ")
      for (i = 1; i <= n; i++) seen[queue[i]] = 1
      for (i = 1; i <= n; i++) {
        m = queue[i]
        if (!(m in known)) { print "unknown-module:" m; continue }
        k = split(dep[m], ds, " ")
        for (j = 1; j <= k; j++) if (ds[j] != "" && !(ds[j] in seen)) { seen[ds[j]] = 1; queue[++n] = ds[j] }
      }
      for (i = 1; i <= n; i++) print queue[i]
    }' "$tree"
}

if [ "$INSTALLED" = 0 ]; then
  if [ -f "$ARCHIVE" ]; then
    say "using the cached build $ARCHIVE"
  else
    build
  fi
  say "installing into $PREFIX"
  # --no-overwrite-dir: existing folders (/usr, /etc, /var) keep their owner and mode.
  tar -xzf "$ARCHIVE" -C / --no-overwrite-dir --no-same-owner 2>/dev/null \
    || { [ "$(id -u)" = 0 ] || die "cannot write into $PREFIX (run as root, or pick a --prefix you own)"; \
         die "cannot unpack $ARCHIVE into $PREFIX (disk full? a damaged cache file can be deleted)"; }
  [ "$PREFIX" = /usr ] || [ "$(id -u)" != 0 ] || ldconfig 2>/dev/null || true
fi
"$ASTERISK_BIN" -V >/dev/null 2>&1 || die "$ASTERISK_BIN does not run after the install"

# ---- sounds and music on hold from Debian ----------------------------------------------------------
# Asterisk's data dir is $localstatedir/lib/asterisk (/var/lib/asterisk for the /usr prefix); the
# Debian packages install under /usr/share/asterisk, so their folders are linked in.
VAR=$([ "$PREFIX" = /usr ] && echo /var || echo "$PREFIX/var")
ETC=$([ "$PREFIX" = /usr ] && echo /etc/asterisk || echo "$PREFIX/etc/asterisk")
DATADIR="$VAR/lib/asterisk"
ensure_packages "sound and music-on-hold" "${SOUND_DEPS[@]}"
mkdir -p "$DATADIR/sounds"
for pair in "sounds/en:/usr/share/asterisk/sounds/en" "moh:/usr/share/asterisk/moh"; do
  link="$DATADIR/${pair%%:*}" target=${pair#*:}
  [ -n "$(ls -A "$target" 2>/dev/null)" ] || die "$target is empty: reinstall ${SOUND_DEPS[*]}"
  # Replace only an empty folder or a link: an operator's own files stay.
  if [ -L "$link" ] || [ ! -e "$link" ] || [ -z "$(ls -A "$link" 2>/dev/null)" ]; then
    rm -rf "$link"; ln -s "$target" "$link"
  fi
done

# ---- system setup ---------------------------------------------------------------------------------
if [ "$SERVICE" = 1 ]; then
  getent group asterisk >/dev/null || groupadd --system asterisk
  getent passwd asterisk >/dev/null \
    || useradd --system --gid asterisk --home-dir "$VAR/lib/asterisk" --shell /usr/sbin/nologin asterisk
  mkdir -p "$ETC" "$VAR/lib/asterisk" "$VAR/log/asterisk" "$VAR/spool/asterisk" "$VAR/run/asterisk"
  chown -R asterisk:asterisk "$VAR/lib/asterisk" "$VAR/log/asterisk" "$VAR/spool/asterisk" "$VAR/run/asterisk"
  chgrp asterisk "$ETC" && chmod 2750 "$ETC"
  # The operator's files: written once, never overwritten (aziza-admin provision asterisk writes the rest).
  write_once() {
    [ -e "$ETC/$1" ] && return 0
    cat >"$ETC/$1"; chgrp asterisk "$ETC/$1"; chmod 640 "$ETC/$1"; say "wrote $ETC/$1"
  }
  write_once asterisk.conf <<EOF
[directories]
astetcdir => $ETC
astmoddir => $PREFIX/lib/asterisk/modules
astvarlibdir => $VAR/lib/asterisk
astdbdir => $VAR/lib/asterisk
astkeydir => $VAR/lib/asterisk
astdatadir => $DATADIR
astagidir => $DATADIR/agi-bin
astspooldir => $VAR/spool/asterisk
astrundir => $VAR/run/asterisk
astlogdir => $VAR/log/asterisk
astsbindir => $PREFIX/sbin

[options]
runuser = asterisk
rungroup = asterisk
EOF
  write_once modules.conf <<'EOF'
[modules]
autoload=yes
EOF
  write_once logger.conf <<'EOF'
[general]

[logfiles]
console => notice,warning,error
messages.log => notice,warning,error
EOF
  if [ -d "$SYSTEMD_DIR" ] && [ ! -e "$SYSTEMD_DIR/asterisk.service" ]; then
    cat >"$SYSTEMD_DIR/asterisk.service" <<EOF
[Unit]
Description=Asterisk PBX (built by aziza asterisk-build.sh)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
# -p: real-time scheduling (SCHED_RR 10, set as root before -U drops to asterisk), as Debian's own unit runs
# it; the bridge's media runs just below (bridge.media_realtime_priority 5).
ExecStart=$ASTERISK_BIN -C $ETC/asterisk.conf -f -p -U asterisk -G asterisk
ExecReload=$ASTERISK_BIN -C $ETC/asterisk.conf -rx 'core reload'
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
EOF
    say "wrote $SYSTEMD_DIR/asterisk.service (systemctl enable --now asterisk)"
  fi
fi

mkdir -p "$(dirname "$MARKER")" && printf '%s\n' "$KEY" >"$MARKER"
say "ready: $("$ASTERISK_BIN" -V) at $ASTERISK_BIN (build key $KEY)"
