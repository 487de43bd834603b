#!/usr/bin/env bash
# Run the full benchmark suite and write JSON, Markdown and PNG files to benchmarks/results/.
#
#   benchmarks/run_suite.sh PHOTO_DIR [PROFILE] [more edgeembed bench options]
#
# Models: the shipped int8 EfficientNet-Lite0, plus the float32, float16 and
# dynamic-range variants of the same backbone found in $EDGEEMBED_BENCH_MODELS
# (default ~/.cache/edgeembed-bench-models). Where TensorFlow is installed (the
# toolchain extra), missing variants are built there with `edgeembed convert`; on a
# board, copy them from a workstation instead. A variant that is absent is left out.
set -euo pipefail

photos=${1:?usage: benchmarks/run_suite.sh PHOTO_DIR [PROFILE] [more edgeembed bench options]}
profile=${2:-host}
shift $(( $# >= 2 ? 2 : 1 ))

here=$(cd "$(dirname "$0")" && pwd)
variants=${EDGEEMBED_BENCH_MODELS:-$HOME/.cache/edgeembed-bench-models}
mkdir -p "$variants"

default_model=$(python -c 'from edgeembed.model import default_model_path; print(default_model_path())')
models=(--model "$default_model")
for quant in float32 float16 dynamic; do
    file="$variants/efficientnet_lite0_$quant.tflite"
    if [[ ! -f "$file" ]] && python -c 'import tensorflow' 2>/dev/null; then
        edgeembed convert efficientnet_lite0 --weights imagenet --quant "$quant" --out "$file"
    fi
    if [[ -f "$file" ]]; then
        models+=(--model "$file")
    else
        echo "run_suite: no $quant variant in $variants; it is left out" >&2
    fi
done

exec edgeembed bench "${models[@]}" --photos "$photos" --profile "$profile" --runs 100 \
    --gallery-sizes 1000,10000,100000 --out "$here/results" "$@"
