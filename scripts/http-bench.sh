#!/usr/bin/env bash
# The HTTP front end under a well-known load generator: oha (crates.io,
# installed into target/oha on first use; ~7 minutes to build on 2 cores)
# against a release `microfaas serve --insecure-no-auth` on 127.0.0.1 (oha
# cannot sign SigV4), noop and sha512 on every backend's warm/hot path, at a
# few client counts. Our own keep-alive client's figures, with SigV4 on, come
# from `compare http`.
#   scripts/http-bench.sh [SECONDS_PER_RUN] [CLIENTS...]
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"
secs="${1:-5}"
shift || true
clients=("${@:-1 16 64}")
read -r -a clients <<< "${clients[*]}"
oha="$target/oha/bin/oha"
if [[ ! -x "$oha" ]]; then
    cargo install --quiet --root "$target/oha" oha --version 1.16.0 --locked
fi
cargo build --quiet --release -p microfaas --bin microfaas
work="$(mktemp -d "$target/tmp/http-bench.XXXXXX")"
"$target/release/microfaas" serve --listen 127.0.0.1:0 --insecure-no-auth \
    --registry "$work/registry" --access-log "$work/access.log" > "$work/out" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q listening "$work/out" 2>/dev/null && break; sleep 0.1; done
url="$(sed -n 's/^listening //p' "$work/out")"
[[ -n "$url" ]] || { echo "server did not start" >&2; exit 1; }
fns="$target/microfaas-functions"
for backend in process language vm; do
    for fn in noop sha512; do
        name="$fn-$backend"
        code="$(base64 -w0 "$fns/$fn.so")"
        printf '{"FunctionName":"%s","Runtime":"microfaas-%s","Role":"r","Handler":"h","Code":{"ZipFile":"%s"}}' \
            "$name" "$backend" "$code" > "$work/create.json"
        curl -sf -o /dev/null -X POST --data-binary @"$work/create.json" "$url/2015-03-31/functions"
        input=""; [[ $fn == sha512 ]] && input=100
        # Warm it up (deploy, first start) before measuring.
        curl -sf -o /dev/null -X POST --data-binary "$input" "$url/2015-03-31/functions/$name/invocations"
        for c in "${clients[@]}"; do
            "$oha" --no-tui -z "${secs}s" -c "$c" -m POST -d "$input" \
                "$url/2015-03-31/functions/$name/invocations" > "$work/oha.out"
            # One line per run: req/s, p50, p99 and the status counts.
            awk -v b="$backend" -v f="$fn" -v c="$c" '
                /Requests\/sec/ { r = $2 }
                /50.00% in/ { p50 = $3 * 1000 }
                /99.00% in/ { p99 = $3 * 1000 }
                /\[[0-9][0-9][0-9]\] [0-9]+ responses/ { codes = codes " " $1 "x" $2 }
                END { printf "%-9s %-7s clients=%-3s %8.0f req/s  p50 %7.1f us  p99 %9.1f us %s\n", b, f, c, r, p50, p99, codes }
            ' "$work/oha.out"
        done
    done
done
