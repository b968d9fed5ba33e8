#!/usr/bin/env bash
# Make here, once, what bench/gpu_check.sh needs carried to the lent GPU machine (ignored by git):
#   .whl/                          the wheels of bench/gpu_wheels.txt (CPython 3.12, x86-64)
#   .comfy/ComfyUI-<version>.tar.xz  a ComfyUI checkout without its tests, venv and caches (~5 MB)
#
#   bash bench/gpu_prepare.sh [COMFYUI_CHECKOUT]    (default: $COMFYUI_DIR; without one, wheels only)
#
# Then check the plan and the size that travels: bash bench/gpu_check.sh --dry-run /tmp/gpu-dry
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64
           --platform manylinux_2_12_x86_64 --platform manylinux1_x86_64)

mkdir -p .whl
# every pinned line except comfy-kitchen, whose pure-Python wheel is asked for on its own below
grep -Eo '^[A-Za-z0-9_.-]+==[^ #]+' bench/gpu_wheels.txt | grep -v '^comfy-kitchen==' > .whl/requirements.txt
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d .whl -r .whl/requirements.txt
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
    --platform any -d .whl "$(grep -Eo '^comfy-kitchen==[^ #]+' bench/gpu_wheels.txt)"
rm .whl/requirements.txt
echo "wheels: $(ls .whl/*.whl | wc -l) files, $(du -sh .whl | cut -f1)"

COMFY="${1:-${COMFYUI_DIR:-}}"
if [ -n "$COMFY" ]; then
    [ -f "$COMFY/main.py" ] || { echo "$COMFY is not a ComfyUI checkout (no main.py)"; exit 1; }
    version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py" 2>/dev/null || true)
    mkdir -p .comfy
    rm -f .comfy/*.tar.xz
    archive=".comfy/ComfyUI-${version:-unknown}.tar.xz"
    # Top-level folders only (comfy_api/input/ is code): the checkout's venv, tests and run-time folders;
    # custom_nodes/ may hold a link to this checkout (the integration tests make one): never packed.
    top=$(basename "$(cd "$COMFY" && pwd)")
    skip=()
    for d in venv .venv .git tests tests-unit user temp output input 'custom_nodes/*' 'models/*/*'; do
        skip+=(--exclude="$top/$d")
    done
    tar -cJf "$archive" "${skip[@]}" --exclude=__pycache__ --exclude='*.pyc' \
        -C "$(dirname "$(cd "$COMFY" && pwd)")" "$top"
    echo "ComfyUI ${version:-?}: $archive, $(du -h "$archive" | cut -f1)"
fi
grep -qx '/.comfy/' .gitignore || echo "note: add /.comfy/ to .gitignore"
