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

echo "setup: ok"
