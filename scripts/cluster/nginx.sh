#!/usr/bin/env bash
# Runs nginx (foreground) in front of three `microfaas serve` nodes, all on
# 127.0.0.1: scripts/cluster/nginx.sh PREFIX LISTEN_PORT NODE1 NODE2 NODE3.
# Installs Debian's nginx-light first if nginx is missing.
set -euo pipefail
if [[ $# -ne 5 ]]; then
    echo "usage: $0 PREFIX LISTEN_PORT NODE1_PORT NODE2_PORT NODE3_PORT" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")/../.." && pwd)"
prefix="$1"
if ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
    apt-get install -y --no-install-recommends nginx-light >&2 \
        || { apt-get update >&2 && apt-get install -y --no-install-recommends nginx-light >&2; }
fi
mkdir -p "$prefix"/tmp/{client_body,proxy,fastcgi,uwsgi,scgi}
# nginx's workers run as nobody when started by root.
chmod -R a+rwx "$prefix/tmp"
sed -e "s#@PREFIX@#$prefix#g" -e "s#@LISTEN@#$2#g" -e "s#@NODE1@#$3#g" -e "s#@NODE2@#$4#g" -e "s#@NODE3@#$5#g" \
    "$here/deploy/nginx/microfaas-cluster.conf" > "$prefix/nginx.conf"
exec "$(command -v nginx || echo /usr/sbin/nginx)" -p "$prefix" -c "$prefix/nginx.conf"
