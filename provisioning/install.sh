#!/usr/bin/env bash
# Install the Aziza appliance.
#
#   provisioning/install.sh            venv in ./.venv with the engine (torch + moshi); runs from the checkout
#   provisioning/install.sh --dev      the same plus test and lint tools and the training pipeline
#   provisioning/install.sh --training the engine plus the fine-tuning pipeline (add --qlora on a CUDA box)
#   provisioning/install.sh --no-engine  skip torch/moshi (bridge + admin only; the echo engine still runs)
#   provisioning/install.sh --system   Debian appliance install: user `aziza`, /opt/aziza venv, /etc/aziza,
#                                      /var/lib/aziza, systemd units (see provisioning/system_install.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0 ENGINE=1 SYSTEM=0 TRAINING=0 QLORA=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --training) TRAINING=1 ;;
    --qlora) TRAINING=1 QLORA=1 ;;
    --no-engine) ENGINE=0 ;;
    --system) SYSTEM=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "install.sh: Python 3.11+ is required (set PYTHON=...)" >&2; exit 1
fi

VENV=${AZIZA_VENV:-.venv}
[ "$SYSTEM" = 1 ] && VENV=/opt/aziza/venv
STARTED=$(date +%s)
step() { echo "install.sh: [$(( $(date +%s) - STARTED )) s] $*"; }
step "virtual environment $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" \
  || { echo "install.sh: cannot create $VENV (Debian: apt-get install python3-venv)" >&2; exit 1; }
# pip prints a line per package it collects and installs: the progress of the long step.
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar on)

extras=()
[ "$ENGINE" = 1 ] && extras+=(engine)
[ "$DEV" = 1 ] && extras+=(dev)
# The default test suite runs the fine-tuning pipeline on a tiny model, so --dev brings it along.
if [ "$ENGINE" = 1 ] && { [ "$DEV" = 1 ] || [ "$TRAINING" = 1 ]; }; then extras+=(training); fi
[ "$ENGINE" = 1 ] && [ "$QLORA" = 1 ] && extras+=(qlora)
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
size="about 250 MB"
[ "$ENGINE" = 1 ] && size="about 1.3 GB with CPU torch (several GB with CUDA torch)"
step "installing $spec ($size; about 4 min on 2 cores)"
install_project() { if [ "$SYSTEM" = 1 ]; then "${PIP[@]}" "$spec"; else "${PIP[@]}" -e "$spec"; fi; }
# The media path's hot modules are compiled by mypyc on the way (setup.py, bridge/native.py: about 30 s);
# where that cannot be done (no C compiler, say), the same modules run from their sources, slower.
if ! install_project; then
  [ "${AZIZA_NATIVE:-1}" = 0 ] && exit 1
  echo "install.sh: the install failed; trying again without the compiled media modules (AZIZA_NATIVE=0)" >&2
  export AZIZA_NATIVE=0
  install_project
fi

if [ "$ENGINE" = 1 ]; then
  step "installing moshi 0.2.13 (without its pins)"
  # moshi 0.2.13 pins torch<2.10 and aiohttp<3.12; its code runs on torch 2.13 (measured), so it is
  # installed without its pins and its real needs come from our `engine` extra.
  "${PIP[@]}" --no-deps "moshi==0.2.13"
fi

if [ "$SYSTEM" = 1 ]; then
  exec provisioning/system_install.sh
fi
step "installed into $VENV"
