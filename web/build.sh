#!/usr/bin/env bash
# Builds the browser module (web/pkg) after installing what it needs on a fresh machine:
# the wasm32 target, the wasm-bindgen-cli of the version Cargo.lock pins, and (as root,
# when missing) Debian's chromium and chromium-driver for web/run.mjs.
#   bash web/build.sh && node web/run.mjs          # the browser tests
#   bash web/build.sh && node web/run.mjs serve    # the training page at http://localhost:8080/web/
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "web/build.sh: chromium and chromedriver are missing (Debian: apt-get install chromium chromium-driver); web/run.mjs needs them" >&2
  fi
fi
if ! command -v node >/dev/null; then
  echo "web/build.sh: node is missing (Debian: apt-get install nodejs); web/run.mjs needs it" >&2
fi

rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || rustup target add wasm32-unknown-unknown
version=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
if ! wasm-bindgen --version 2>/dev/null | grep -qx "wasm-bindgen $version"; then
  cargo install wasm-bindgen-cli --version "$version"
fi

cargo build -p fused-rmsprop-web --target wasm32-unknown-unknown --profile wasm
wasm-bindgen --target web --no-typescript --out-dir web/pkg \
  target/wasm32-unknown-unknown/wasm/fused_rmsprop_web.wasm
echo "web/pkg: $(du -h web/pkg/fused_rmsprop_web_bg.wasm | cut -f1) of wasm"
