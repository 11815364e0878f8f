#!/usr/bin/env bash
# Quick start on a fresh machine: set up a virtualenv, install Warden, make a
# dev JWT secret (kept in .warden-dev.env so `warden token` can use it), and
# run `warden serve --config config.example.toml`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
if [ ! -f .warden-dev.env ]; then
  umask 077
  {
    echo "export WARDEN_DEV_JWT_SECRET=$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(32))')"
    echo "export WARDEN_ADMIN_TOKEN=$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))')"
  } > .warden-dev.env
fi
# shellcheck disable=SC1091
. ./.warden-dev.env
mkdir -p var
exec .venv/bin/warden serve --config config.example.toml
