# Dispatch: authenticated ESMTP relay (see README.md).
#
#   docker build -t dispatch .
#   docker run --rm -p 2525:2525 --env-file my.env --stop-timeout 40 dispatch
#
# (`docker run --env-file` takes each value verbatim, quotes included: write
# the RELAY_PASSWORD hash there without quotes. Compose's env_file is the
# opposite, see compose.yaml.)
#
# The image listens on 2525, not 25: it runs as a non-root user, which may not
# bind a port below 1024 everywhere. Publish it as 25 on the host if the apps
# must use 25 ("-p 25:2525"), or put a Kubernetes Service port 25 in front.
#
# bcrypt ships manylinux wheels for amd64 and arm64, so the slim image needs no
# compiler.

FROM python:3.12-slim-bookworm

LABEL org.opencontainers.image.title="dispatch" \
      org.opencontainers.image.description="Authenticated ESMTP relay that queues mail and forwards it in batches to one upstream"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can check it and a
# host directory can be chowned to it (deploy/kubernetes.yaml does).
# --no-log-init: a high UID would otherwise bloat /var/log/faillog.
RUN groupadd --system --gid 10001 dispatch \
 && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin dispatch \
 && mkdir -p /var/spool/dispatch \
 && chown 10001:10001 /var/spool/dispatch \
 && chmod 0700 /var/spool/dispatch

WORKDIR /app

# The application files stay owned by root: the relay can read, not change them.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY dispatch.py ./

ENV RELAY_PORT=2525 \
    DISPATCH_METRICS_PORT=9025 \
    DISPATCH_SPOOL=/var/spool/dispatch

# Declared after the directory is created and chowned: a new named volume is
# seeded from the image, so it starts owned by 10001 too.
VOLUME ["/var/spool/dispatch"]

# 2525: SMTP (RELAY_PORT). 9025: GET /healthz and GET /metrics.
EXPOSE 2525 9025

USER 10001:10001

# SIGTERM drains: sessions in DATA finish, one last flush, exit 0 within
# DISPATCH_DRAIN_TIMEOUT (30 s by default). `docker stop` waits only 10 s
# before SIGKILL, so give it more: `docker stop -t 40`, `docker run
# --stop-timeout 40`, or compose's stop_grace_period (compose.yaml sets 40s).
# A spool (the default here) keeps whatever a SIGKILL interrupts.
STOPSIGNAL SIGTERM

# The slim image has no curl: probe /healthz with the standard library. A 503
# (3 failed flushes in a row) or no answer exits 1 with a one-line reason.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.excepthook = lambda t, e, tb: print('unhealthy:', getattr(e, 'read', lambda: str(e).encode())().decode(errors='replace').strip(), file=sys.stderr); print(urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('DISPATCH_METRICS_PORT', '9025') + '/healthz', timeout=4).read().decode().strip())"]

CMD ["python", "dispatch.py"]
