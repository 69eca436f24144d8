# acme-registry: a container image registry that obtains and renews its own ACME certificate.
#
#   docker build -t acme-registry .
#   docker build --build-arg REGISTRY_IMAGE=registry:2 -t acme-registry:registry2 .
#
# REGISTRY_IMAGE supplies /bin/registry (distribution 3.x by default; registry:2 still works).
# PYTHON_IMAGE must be Debian-based with python3 >= 3.11 and the venv module; both stages
# use it so the venv's interpreter path stays valid in the final image.
ARG REGISTRY_IMAGE=registry:3
ARG PYTHON_IMAGE=python:3.13-slim

FROM ${REGISTRY_IMAGE} AS registry

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/acme-registry
# The versions `make test` ran against, so the same source always gives the same image;
# pyproject.toml keeps the ranges: change both together. The dependencies go in first, in
# their own layer, so a change to the source alone rebuilds only the last step. The second
# list is the build backend that makes the project's wheel.
RUN printf '%s\n' \
        acme==5.9.0 \
        bcrypt==5.0.0 \
        boto3==1.44.8 \
        botocore==1.44.8 \
        certifi==2026.10.19.post1 \
        cffi==2.1.1 \
        charset-normalizer==3.5.3 \
        cryptography==50.0.2 \
        dnspython==2.9.2 \
        idna==3.20 \
        jmespath==1.1.0 \
        josepy==2.2.0 \
        prometheus-client==0.26.0 \
        pycparser==3.12 \
        pyOpenSSL==26.4.0 \
        PyYAML==6.0.4 \
        pyRFC3339==2.1.1 \
        python-dateutil==2.9.0.post0 \
        requests==2.34.2 \
        s3transfer==0.19.3 \
        six==1.17.0 \
        supervisor==4.3.0 \
        typing_extensions==4.16.0 \
        urllib3==2.8.0 \
        > /tmp/requirements.txt \
 && printf '%s\n' \
        hatchling==1.33.0 \
        packaging==26.4 \
        pathspec==1.1.1 \
        pluggy==1.7.0 \
        tomlkit==0.15.2 \
        trove-classifiers==2026.9.21.13 \
        > /tmp/build-requirements.txt \
 && cat /tmp/requirements.txt /tmp/build-requirements.txt > /tmp/constraints.txt \
 && /opt/acme-registry/bin/pip install --no-cache-dir --requirement /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY entrypoint/supervisord.conf /src/entrypoint/
COPY src /src/src
# PIP_CONSTRAINT rather than --constraint: it also pins the isolated build environment.
# The check fails the build if the wheel lost supervisord.conf (hatch force-include).
RUN PIP_CONSTRAINT=/tmp/constraints.txt /opt/acme-registry/bin/pip install --no-cache-dir /src \
 && /opt/acme-registry/bin/python -c \
        "import acme_registry.launcher as l; assert 'site-packages' in str(l.supervisord_conf())" \
 && /opt/acme-registry/bin/python -m pip uninstall --yes --quiet pip setuptools

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/acme-registry/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CERT_DIR=/certs \
    DATA_DIR=/data \
    REGISTRY_BINARY=/bin/registry
COPY --from=registry /bin/registry /bin/registry
COPY --from=build /opt/acme-registry /opt/acme-registry
COPY entrypoint/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
# The directories exist and belong to the user before VOLUME, so a new named volume starts
# out owned by it (Docker and podman copy the image's ownership into an empty volume).
RUN groupadd --system --gid 10001 acme \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin acme \
 && mkdir -p /data /certs /var/lib/registry \
 && chown 10001:10001 /data /certs /var/lib/registry \
 && chmod 0700 /data \
 && chmod 0755 /usr/local/bin/docker-entrypoint.sh \
 && /bin/registry --version
USER 10001:10001
VOLUME ["/data", "/certs", "/var/lib/registry"]
# 80: HTTP-01 challenges and the redirect to https; 443: the registry; 5001: the token
# service (AUTH_MODE=token only).
EXPOSE 80 443 5001
# Liveness only: "health" answers while the agent runs, also before the first certificate
# (readiness is `acme-registry health --ready`). start-period covers a first issuance.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["acme-registry", "health"]
# supervisord (in `acme-registry run`, PID 1) stops the registry with SIGTERM and waits for
# its drain: REGISTRY_HTTP_DRAINTIMEOUT (30s) + 5 s. `docker stop -t` / compose
# stop_grace_period / terminationGracePeriodSeconds must be longer than that: use 45s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["run"]
