#!/usr/bin/env bash
# Install what building and testing Trellis needs on a fresh Debian machine with rustup.
# Safe to run again: each step is skipped when already done.
set -euo pipefail

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "setup: adding the wasm32-wasip2 Rust target"
    rustup target add wasm32-wasip2
fi

# The web page's test (host/tests/web_page.rs) drives Debian's chromium headless.
if ! command -v chromium >/dev/null; then
    echo "setup: installing chromium (for the web page's test)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y chromium
fi

# Kafka-protocol broker for the Kafka transport's tests (a real one, on loopback).
# The default build has no working storage engine: enable dynostore and libsql.
if ! command -v tansu >/dev/null; then
    echo "setup: installing the tansu Kafka broker (about 12 minutes)"
    cargo install tansu --version '^0.6' --locked --features dynostore,libsql
fi

# An independent Kafka client (pure Python) to read what Trellis wrote to the topics.
if ! python3 -c 'import kafka' 2>/dev/null; then
    echo "setup: installing kafka-python"
    python3 -m pip install -q kafka-python 2>/dev/null \
        || python3 -m pip install -q --break-system-packages kafka-python
fi

echo "setup: ok"
