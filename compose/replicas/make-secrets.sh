#!/bin/sh
# Creates the secrets of docker-compose.replicas.yml once, in compose/replicas/secrets/:
#   state-encryption-key   32 random bytes as 64 hex characters (STATE_ENCRYPTION_KEY_FILE)
#   s3-credentials         an AWS shared-credentials file for the replicas (registry + agent)
#   s3-identities.json     the same key pair for the local SeaweedFS
# Existing files are kept: a new encryption key would make the stored state unreadable.
# The replicas run as uid 10001 and read the first two through bind mounts, so they belong
# to 10001 (run this as root, or chown them afterwards as printed).
set -eu
umask 077
dir=${1:-$(dirname "$0")/secrets}
mkdir -p "$dir"
cd "$dir"
if [ ! -e state-encryption-key ]; then
    openssl rand -hex 32 > state-encryption-key
fi
if [ ! -e s3-credentials ] || [ ! -e s3-identities.json ]; then
    key=$(openssl rand -hex 10)
    secret=$(openssl rand -hex 20)
    printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' \
        "$key" "$secret" > s3-credentials
    printf '{"identities": [{"name": "acme-registry", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' \
        "$key" "$secret" > s3-identities.json
fi
if ! chown 10001:10001 state-encryption-key s3-credentials 2>/dev/null; then
    echo "now run: sudo chown 10001:10001 $dir/state-encryption-key $dir/s3-credentials" >&2
fi
echo "secrets in $dir"
