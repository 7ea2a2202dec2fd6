#!/usr/bin/env bash
# Build the example flows with zig's C compiler from PyPI (pip install ziglang).
# Outputs are committed next to the sources so tests need no toolchain.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# shellcheck disable=SC2054  # -Wl,-z,stack-size=... is one linker argument, commas and all
CC=("$PY" -m ziglang cc --target=wasm32-wasi -mexec-model=reactor -O2 -s
    -Wl,-z,stack-size=1048576 -Iinclude)
"${CC[@]}" counter/counter.c -o counter/counter.wasm
"${CC[@]}" greenhouse/sensor.c -o greenhouse/sensor.wasm
"${CC[@]}" greenhouse/alarm.c -o greenhouse/alarm.wasm
"$PY" -m agent bundle build greenhouse -o greenhouse.tar.gz
sha256sum counter/counter.wasm greenhouse/*.wasm greenhouse.tar.gz
