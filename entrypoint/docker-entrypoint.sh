#!/bin/sh
# The image's entrypoint: `docker run IMAGE [run|check|status|health|renew|user ...]`.
#
# `acme-registry run` validates the configuration before anything else (status 2 and one
# line naming the variable), checks that its volumes are writable and its ports bindable
# (status 1 and one line with the fix), then runs supervisord in its own process: PID 1 is
# supervisord, which reaps children and handles SIGTERM, and exits 1 when the registry or
# the agent gives up, so the orchestrator notices.
set -eu

if [ "$#" -eq 0 ]; then
    set -- run
fi

case "$1" in
    run | check | status | health | renew | user | -*) ;;
    *)
        # Anything else is a command to run in the image (sh, registry --version, ...).
        exec "$@"
        ;;
esac
exec acme-registry "$@"
