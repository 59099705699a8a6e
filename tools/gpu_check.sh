#!/usr/bin/env bash
# The GPU command: on a GPU machine that has Python 3.12 and a recent torch, and no internet,
# install dkd-det on the current stack into that Python (its own torch kept), building detectron2
# at the pinned commit with its CUDA kernels, then run the fast tests and tools/benchmark.py.
#
#   tools/gpu_check.sh --download DIR    # on a machine with PyPI: the wheels the rest needs
#   WHEELHOUSE=DIR tools/gpu_check.sh    # on the GPU machine, offline (without WHEELHOUSE:
#                                        # from the package index)
#
# PYTHON (default python3) is the interpreter to install into; OUT (default
# outputs/gpu_check) receives the logs and benchmark.json. detectron2's source comes from
# ../shared/vendor/ beside the checkout (tools/install_detectron2.sh). Where torch sees no GPU or
# there is no nvcc, the same steps run on the CPU with a --toy benchmark (how it is tested).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
out=${OUT:-outputs/gpu_check}
# The current stack's pins less torch and torchvision (the machine's own), the test tools, and
# what detectron2's wheel requires beyond them.
deps=$(mktemp)
trap 'rm -f "$deps"' EXIT
grep -v '^torch' requirements/current.txt >"$deps"
cat requirements/dev.txt >>"$deps"
printf '%s\n' 'omegaconf>=2.1,<2.4' 'hydra-core>=1.1' tensorboard cloudpickle yacs tabulate \
    termcolor tqdm packaging Pillow >>"$deps"

if [ "${1:-}" = "--download" ]; then
    "$PYTHON" -m pip download -d "${2:?usage: $0 --download DIR}" -r "$deps"
    exit
fi

mkdir -p "$out"
if [ -n "${WHEELHOUSE:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELHOUSE" -r "$deps"
else
    "$PYTHON" -m pip install -q -r "$deps"
fi
if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' &&
    command -v nvcc >/dev/null; then
    export FORCE_CUDA=1
    bench=(--device cuda --amp)
else
    echo "no GPU or no nvcc: the CPU fallback (detectron2's CPU ops, a --toy benchmark)"
    bench=(--toy)
fi
start=$(date +%s)
PYTHON=$PYTHON tools/install_detectron2.sh
echo "detectron2 installed in $(($(date +%s) - start)) s (0 if its wheel was cached)"
"$PYTHON" -m pip install -q --no-deps -e .
"$PYTHON" -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|numpy|detectron2|onnx|onnxruntime) ' |
    tee "$out/versions.txt"
"$PYTHON" -m pytest -q -m "not slow" tests >"$out/tests.log" 2>&1 || echo "fast tests FAILED"
tail -n 3 "$out/tests.log"
"$PYTHON" tools/benchmark.py "${bench[@]}" --output "$out/benchmark" 2>&1 | tee "$out/benchmark.log"
