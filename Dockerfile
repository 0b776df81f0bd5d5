# Ferry's image: ferry-server, the ferry CLI, and the test handlers and record
# producer used by docker-compose.yml. Built with the same tools as CI
# (scripts/install-build-deps.sh), in release and without the tests' fail points.
FROM rust:1.90-bookworm AS build
WORKDIR /src
COPY scripts/install-build-deps.sh scripts/
RUN scripts/install-build-deps.sh
COPY . .
RUN cargo build --release --workspace --bins --locked

FROM debian:bookworm-slim
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/ferry-server /src/target/release/ferry \
    /src/target/release/ferry-test-handlers /src/target/release/ferry-produce /usr/local/bin/
# Node port (Raft, /metrics), admin API, HTTP ingress.
EXPOSE 5122 9070 8080
ENTRYPOINT ["ferry-server"]
