# syntax=docker/dockerfile:1
# One image for `gateway`, `publisher` and `standalone` (the default command).
#   docker build -t eventgate .
#   docker run --rm -p 8080:8080 -p 8081:8081 eventgate

# The toolchain the test suite runs on.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p eventgate \
    && cp target/release/eventgate /eventgate \
    && strip /eventgate

FROM debian:bookworm-slim
# CA certificates: Redis over TLS (rediss://) trusts the system's roots unless
# REDIS_TLS_CA_FILE names a private CA. Mount the CA and any client certificate read-only, e.g.
#   docker run -v ./redis-tls:/etc/eventgate/redis-tls:ro \
#     -e REDIS_URL=rediss://redis.example.com:6380 \
#     -e REDIS_TLS_CA_FILE=/etc/eventgate/redis-tls/ca.crt eventgate gateway
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 eventgate \
    && useradd --system --uid 10001 --gid eventgate --no-create-home --shell /usr/sbin/nologin eventgate
COPY --from=build /eventgate /usr/local/bin/eventgate
USER 10001:10001
# Listen on every interface inside the container.
ENV GATEWAY_ADDR=0.0.0.0:8080 PUBLISHER_ADDR=0.0.0.0:8081 LOG_FORMAT=json
EXPOSE 8080 8081
# The gateway's port; the publisher's container overrides it (docker-compose.yml).
HEALTHCHECK --interval=10s --timeout=4s --start-period=5s --retries=3 \
    CMD ["eventgate", "health", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["eventgate"]
CMD ["standalone"]
