#!/usr/bin/env bash
# Runs every Medallion test: each crate's unit tests and the cross-service tests, which start
# the real service binaries on loopback ports against a local PostgreSQL and Python clients.
# Needs: the Rust toolchain of rust-toolchain.toml, PostgreSQL on 127.0.0.1:5432 (started here
# if it is installed but stopped), python3 with venv (the client packages are installed here),
# apt (cmake and libcurl headers for the Kafka client) and crates.io (the tansu broker).
set -euo pipefail
cd "$(dirname "$0")/.."

pg_url=${MEDALLION_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432
if ! psql "$pg_url" -qtAc 'SELECT 1' >/dev/null 2>&1; then
  createdb -h 127.0.0.1 -U postgres test
fi
export MEDALLION_TEST_PG_URL="$pg_url"

venv=${MEDALLION_PY_VENV:-$HOME/.cache/medallion/venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt
export MEDALLION_TEST_PYTHON="$venv/bin/python"

# Build tools of the Kafka client (librdkafka is compiled from source by rdkafka's cmake-build,
# with OpenSSL for TLS and SASL).
if ! command -v cmake >/dev/null || ! dpkg -s libcurl4-openssl-dev libssl-dev >/dev/null 2>&1; then
  echo "installing cmake, libcurl and OpenSSL headers"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake libcurl4-openssl-dev libssl-dev pkg-config >/dev/null
fi

# The Kafka-compatible broker of the CDC tests (tansu, SQLite storage), built once into a
# folder that outlives the clone (about 20 minutes on two cores the first time).
tools=${MEDALLION_TOOLS_DIR:-/var/tmp/medallion-tools}
if [ ! -x "$tools/bin/tansu" ]; then
  echo "installing tansu into $tools (once)"
  cargo install tansu --version 0.6.0 --features dynostore,libsql --locked --root "$tools" \
    --target-dir "$tools/build" --quiet
fi
export MEDALLION_TANSU="$tools/bin/tansu"

# The Helm chart: lint, render, schema validation and policy scan, offline.
bash helm/check.sh

# The cross-service tests spawn the service binaries, so build them first.
cargo build --workspace --bins --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets --locked 2>&1 | tee "$log"
# One closing line for the whole workspace (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "workspace: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
