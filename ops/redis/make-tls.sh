#!/usr/bin/env bash
# A private CA and a Redis server certificate, for `rediss://` between the hosts and Redis.
#
# Usage: ops/redis/make-tls.sh OUT_DIR HOST [HOST...]
#   HOST: every name or IP address the workers and the gateway use to reach Redis
#         (e.g. redis.internal 10.0.0.5); the first is the certificate's common name.
# Writes OUT_DIR/ca.crt (copy it to every Mac and host), OUT_DIR/redis.crt and OUT_DIR/redis.key
# (for Redis only). An existing CA in OUT_DIR is reused, so adding a host name keeps the Macs' ca.crt valid.
# REDIS_UID (default 999, the uid of the official Docker image's redis user) must read redis.key:
# run as root to chown it to that uid; otherwise it is left readable by all (keep OUT_DIR private).
set -euo pipefail

[ $# -ge 2 ] || { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
out="$1"
shift
command -v openssl >/dev/null 2>&1 || { echo "make-tls: openssl not found" >&2; exit 1; }
mkdir -p "$out"
cd "$out"

san=""
for host in "$@"; do
    if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then san+="IP:$host,"; else san+="DNS:$host,"; fi
done
san="${san%,}"

umask 077
if [ ! -f ca.key ]; then
    openssl req -x509 -new -nodes -newkey rsa:3072 -sha256 -days 3650 \
        -keyout ca.key -out ca.crt -subj "/CN=genq Redis CA" 2>/dev/null
fi
openssl req -new -nodes -newkey rsa:3072 -sha256 -keyout redis.key -out redis.csr -subj "/CN=$1" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n' "$san" > redis.ext
openssl x509 -req -in redis.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 825 \
    -extfile redis.ext -out redis.crt 2>/dev/null
rm -f redis.csr redis.ext
chmod 644 ca.crt redis.crt
if [ "$(id -u)" = 0 ]; then
    chown "${REDIS_UID:-999}" redis.key
    chmod 600 redis.key
else
    chmod 644 redis.key
fi
echo "made $(pwd)/ca.crt (for every client) and redis.crt + redis.key (for Redis) for: $san" >&2
