# Multi-stage build: compile with the Rust toolchain, run on a slim Debian as a non-root user.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev cmake libssl-dev libsasl2-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin pgcdc

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libstdc++6 libssl3 libsasl2-2 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/pgcdc --create-home pgcdc \
 && install -d -o pgcdc -g pgcdc -m 0700 /var/lib/pgcdc/state
# state_dir exists and belongs to pgcdc, so an empty volume mounted there (compose:
# pgcdcstate) starts with that owner instead of root.
COPY --from=build /src/target/release/pgcdc /usr/local/bin/pgcdc
COPY config/ /etc/pgcdc/
USER pgcdc
WORKDIR /var/lib/pgcdc

ENTRYPOINT ["pgcdc"]
CMD ["--config", "/etc/pgcdc/docker.toml", "run"]
