#!/usr/bin/env bash
# One entry point for a fresh Debian machine (run as root, or with sudo available):
#   bash setup.sh demo [submit.py args]   install what is missing, then run the embedded demo
#   bash setup.sh test [pytest args]      install what is missing (incl. SLURM/munge), then lint and test
# Idempotent: system packages are checked with dpkg, the venv is rebuilt only when requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")"

mode=${1:-}
case "$mode" in
  demo|test) shift ;;
  *) echo "usage: bash setup.sh demo|test [args...]  (demo: run the embedded demo; test: run lint + tests)" >&2
     exit 2 ;;
esac

# --- system packages ------------------------------------------------------------------------------
# FFCV compiles against OpenCV and libjpeg-turbo through pkg-config; the tests start a real SLURM.
apt_pkgs=(git build-essential pkg-config libturbojpeg0-dev libopencv-dev python3-venv python3-dev)
[ "$mode" = test ] && apt_pkgs+=(slurm-wlm munge iproute2 procps)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Python 3.11 venv with the pinned requirements ------------------------------------------------
python=""
for cand in python3.11 python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    python=$(command -v "$cand"); break
  fi
done
[ -n "$python" ] || { echo "setup: Python 3.11 is required (torch 2.14.1 / FFCV wheels are built for it); install python3.11" >&2; exit 1; }

stamp=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
  echo "setup: creating .venv and installing pinned requirements (first run takes a few minutes)"
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q --no-deps -e .
  echo "$stamp" > .venv/.installed
fi

# --- run ------------------------------------------------------------------------------------------
if [ "$mode" = demo ]; then
  exec .venv/bin/python launchers/submit.py --local "$@"
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
