#!/usr/bin/env bash
# Builds Medallion (release) and runs `medallion demo`; arguments are passed to the demo,
# e.g. `bash deploy/demo.sh --scale-factor 1 --warehouse postgres://postgres@127.0.0.1/test`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --locked
exec "${CARGO_TARGET_DIR:-target}/release/medallion" demo "$@"
