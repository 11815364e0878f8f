#!/usr/bin/env bash
# Quick start on a fresh machine (Python 3.11): a virtualenv in .venv with Warden and its
# test extras, dev secrets in .warden-dev.env (an HS256 JWT secret and an admin token),
# then one of:
#   - the offline demo (`warden demo`) when no provider key is set: Warden on a scripted
#     model with sample documents and tools, a guided walk-through, then it stays up for
#     your own SDK calls until Ctrl-C;
#   - `warden serve --config config.example.toml` when OPENAI_API_KEY is set.
#
# Options: --demo (the demo even with a key), --serve (serve even without a key: a provider
# that needs none, set in [upstream] of config.example.toml), --no-wait (the demo exits
# after its walk-through; for CI), --setup-only (install and write the secrets, start nothing).
# Arguments after -- go to `warden demo` (e.g. -- --port 0 --admin-port 0 for any free ports).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=auto
demo_args=()
while [ $# -gt 0 ]; do
  arg=$1
  shift
  case "$arg" in
    --) demo_args+=("$@"); break ;;
    --demo) mode=demo ;;
    --serve) mode=serve ;;
    --setup-only) mode=setup ;;
    --no-wait) demo_args+=(--no-wait) ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "quickstart.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "quickstart.sh: Python 3.11 or newer is needed as python3" >&2; exit 2; }
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# An editable install from before the package was named llm_warden left its metadata at the top of
# the checkout; with the checkout on sys.path (pytest does that) it would name the old module paths.
rm -rf llm_warden.egg-info
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

if [ "$mode" = auto ]; then
  if [ -n "${OPENAI_API_KEY:-}" ]; then mode=serve; else mode=demo; fi
fi
case "$mode" in
  setup)
    echo "Installed in .venv; dev secrets in .warden-dev.env. Next: scripts/quickstart.sh (the demo) or --serve." ;;
  demo)
    if [ -z "${OPENAI_API_KEY:-}" ]; then
      echo "No provider key (OPENAI_API_KEY) is set: starting the offline demo on a scripted model."
      echo "For a real provider, stop this, then: export OPENAI_API_KEY=... and run scripts/quickstart.sh again"
      echo "(another OpenAI-compatible provider: set [upstream] base_url and api_key_env in config.example.toml, then --serve)."
      echo
    fi
    exec .venv/bin/warden demo ${demo_args[@]+"${demo_args[@]}"} ;;
  serve)
    exec .venv/bin/warden serve --config config.example.toml ;;
esac
