#!/usr/bin/env bash
# The Lambda API through unmodified clients: boto3 and the AWS CLI (pinned,
# from PyPI, into a virtualenv under target/) against `microfaas serve`
# processes this script's tests start on 127.0.0.1. Then the cluster test
# (3 nodes + nginx) unless MICROFAAS_SKIP_CLUSTER=1.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target="${CARGO_TARGET_DIR:-$root/target}"
venv="$target/pyenv"
pins="boto3==1.44.8 botocore==1.44.8 awscli==1.46.3 pytest==9.2.0"

# The virtualenv, made once per set of pins.
if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.pins" 2>/dev/null)" != "$pins" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check $pins
    echo "$pins" > "$venv/.pins"
fi

# The server binary and the example functions' artifacts (build.rs writes
# them to $target/microfaas-functions).
cargo build --quiet -p microfaas --bin microfaas
export MICROFAAS_BIN="$target/debug/microfaas"
export MICROFAAS_FUNCTIONS_DIR="$target/microfaas-functions"
export MICROFAAS_TEST_TMP="$target/tmp/python-tests"
mkdir -p "$MICROFAAS_TEST_TMP"

tests=(tests/python/test_lambda_api.py)
if [[ "${MICROFAAS_SKIP_CLUSTER:-0}" != 1 ]]; then
    tests+=(tests/python/test_cluster.py)
    # The cluster's load balancer: Debian's nginx.
    if ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
        apt-get install -y --no-install-recommends nginx-light \
            || { apt-get update && apt-get install -y --no-install-recommends nginx-light; }
    fi
fi
# pytest exits 0 only when tests ran and passed (5 = none collected): any
# other status fails this script, and so does a run that passed fewer tests
# than the files define.
set +e
"$venv/bin/python" -m pytest -p no:cacheprovider -q -rA "${tests[@]}" "$@" | tee "$MICROFAAS_TEST_TMP/pytest.out"
status=${PIPESTATUS[0]}
set -e
if [[ $status -ne 0 ]]; then
    echo "python tests failed (pytest exit status $status)" >&2
    exit 1
fi
defined=$(cat "${tests[@]}" | grep -c '^def test_')
passed=$(grep -c '^PASSED ' "$MICROFAAS_TEST_TMP/pytest.out" || true)
# (A run narrowed with pytest arguments, e.g. -k, is not held to the count.)
if [[ $# -eq 0 && $passed -lt $defined ]]; then
    echo "python tests: $passed passed but $defined defined" >&2
    exit 1
fi
echo "python tests: $passed passed"
