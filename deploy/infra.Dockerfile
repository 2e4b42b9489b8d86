# A local stand-in for the official `redis` and `haproxy` images, for machines that reach
# no image registry (compose.yaml uses it when REDIS_IMAGE / HAPROXY_IMAGE name it):
#
#   make infra-image    # localhost/coinvoice-infra:dev
#
# Debian bookworm's redis-server 7.0 (with redis-cli and Sentinel) and HAProxy 2.6: the
# versions deploy/haproxy.cfg and the tests are written against. Elsewhere use the official
# images; the commands in compose.yaml work with both.
ARG BASE=docker.io/library/debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server haproxy \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o redis -g redis /data
WORKDIR /data
