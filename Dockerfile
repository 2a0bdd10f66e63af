# Build stage: compile the release binary.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Everything cargo needs to load the workspace (bench is a member) and build
# the binary; .ci/docker-context builds from exactly these files in CI.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY ui ./ui
COPY config ./config
COPY bench ./bench
# Without the debug info the release profile keeps for profiling (about 66
# of the binary's 85 MB).
RUN CARGO_PROFILE_RELEASE_DEBUG=false cargo build --release --locked --bin creditgate

# Runtime stage: the binary, the example config, a non-root user, /data.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data creditgate \
 && mkdir -p /data /etc/creditgate \
 && chown creditgate /data \
 && chmod 700 /data
COPY --from=build /src/target/release/creditgate /usr/local/bin/creditgate
COPY config /etc/creditgate
# The proxy listens on all interfaces inside the container. The admin
# listener stays on the container's loopback: /metrics, /healthz and /readyz
# there need no token, so it is not reachable from outside unless the operator
# opens it on purpose (`serve ... --admin-listen 0.0.0.0:8081`, on a private
# network only). The health check runs inside the container, on /readyz: a
# gateway whose store fails (a full disk) refuses every hold and is not healthy.
# `docker stop` sends SIGKILL 10 s after SIGTERM (its default): the grace
# in which in-flight requests finish, after which the rest are cut and
# charged, must end before that, or the cut requests are never charged
# (run with `--stop-timeout` above the grace to give streams longer).
RUN sed -i 's/^listen = "127.0.0.1:8080"/listen = "0.0.0.0:8080"/; s#^data_dir = "./data"#data_dir = "/data"#; s/^shutdown_grace_ms = 10000/shutdown_grace_ms = 7000 /' /etc/creditgate/gateway.toml \
 && grep -q '^listen = "0.0.0.0:8080"' /etc/creditgate/gateway.toml \
 && grep -q '^admin_listen = "127.0.0.1:8081"' /etc/creditgate/gateway.toml \
 && grep -q '^data_dir = "/data"' /etc/creditgate/gateway.toml \
 && grep -q '^shutdown_grace_ms = 7000 ' /etc/creditgate/gateway.toml
USER creditgate
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8081/readyz || exit 1
ENTRYPOINT ["creditgate"]
CMD ["serve", "--config", "/etc/creditgate/gateway.toml"]
