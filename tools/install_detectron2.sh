#!/usr/bin/env bash
# Install detectron2 at the pinned upstream commit into the Python environment of $PYTHON
# (default: python3), which must already have torch: detectron2's setup.py imports it, so the
# build runs with --no-build-isolation.
#
# Where the source comes from, first found:
#   $DETECTRON2_SRC               an unpacked detectron2 source tree of that commit;
#   $DETECTRON2_ARCHIVE           or a `git archive` of it (default: ../shared/vendor/
#                                 detectron2-<short>.tar.gz beside this checkout), whose SHA-256
#                                 is checked before anything is unpacked;
#   GitHub                        git+https://github.com/facebookresearch/detectron2@<commit>.
# The wheel is built once per (commit, Python, torch, CPU or CUDA) into $DKD_DET_CACHE
# (default ~/.cache/dkd-det) and reused by every later install with the same key.
# FORCE_CUDA=1 (detectron2's own switch) builds the CUDA kernels too (needs nvcc).
set -euo pipefail

COMMIT=02b5c4e295e990042a714712c21dc79b731e8833
ARCHIVE_SHA256=242b9d82c5479746ea3e4bbec5c0f4bea881ded85df269ad87e3f7de516a4c56

PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
archive=${DETECTRON2_ARCHIVE:-$here/../shared/vendor/detectron2-${COMMIT:0:7}.tar.gz}
cache=${DKD_DET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dkd-det}

# CUDA kernels are built with FORCE_CUDA=1, or where torch sees a GPU (detectron2's setup.py).
key=$("$PYTHON" - "$COMMIT" <<'EOF'
import os, sys, torch
cuda = os.environ.get("FORCE_CUDA") == "1" or torch.cuda.is_available()
kernels = f"cu{torch.version.cuda.replace('.', '')}" if cuda and torch.version.cuda else "cpu"
print(f"{sys.argv[1][:7]}-cp{sys.version_info[0]}{sys.version_info[1]}"
      f"-torch{torch.__version__.replace('+', '-')}-{kernels}")
EOF
) || { echo "error: $PYTHON cannot import torch; install torch first (README, Environment)" >&2; exit 1; }
wheels=$cache/detectron2/$key

if ! ls "$wheels"/detectron2-*.whl >/dev/null 2>&1; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    if [ -n "${DETECTRON2_SRC:-}" ]; then
        src=$DETECTRON2_SRC
    elif [ -f "$archive" ]; then
        sum=$(sha256sum "$archive" | cut -d' ' -f1)
        if [ "$sum" != "$ARCHIVE_SHA256" ]; then
            echo "error: $archive has SHA-256 $sum, not $ARCHIVE_SHA256 (detectron2 at" \
                 "${COMMIT:0:7}): replace it with a git archive of that commit" >&2
            exit 1
        fi
        tar -xzf "$archive" -C "$work"
        src=$work/detectron2
    else
        src=git+https://github.com/facebookresearch/detectron2@$COMMIT
    fi
    echo "building detectron2 ${COMMIT:0:7} ($key) from $src: a few minutes, once"
    "$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$work/out" "$src"
    mkdir -p "$wheels"
    mv "$work"/out/detectron2-*.whl "$wheels/"
fi
"$PYTHON" -m pip install -q "$wheels"/detectron2-*.whl
