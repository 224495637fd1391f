#!/usr/bin/env bash
# Downloads, as wheels, what benchmarks/gpu/check.py needs beside torch and Triton, so that the GPU
# check runs on a machine with no network: that machine brings its own CUDA torch and Triton (never
# shipped: the wrong build would replace a working one), and the project travels as source.
#
#   bash benchmarks/gpu/bundle.sh [DIR]     # DIR: $SLEEPSCALE_WHEELS, else .whl (git-ignored)
#   SLEEPSCALE_BUNDLE_PYTHON=3.11 ...        # wheels for another CPython than the GPU images' 3.12
#
# Then `bash benchmarks/gpu/check.sh` installs them with no index (see there). Rerunning downloads
# only what is missing. A device call carries at most 64 MiB, so the folder must stay below that.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-${SLEEPSCALE_WHEELS:-.whl}}
python_version=${SLEEPSCALE_BUNDLE_PYTHON:-3.12}
# Any Python with pip can download for another interpreter; the project's venv has a recent pip.
pip_python=${SLEEPSCALE_PIP_PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
limit_mib=64

# What check.py imports, found with `python -X importtime`: sleepscale's config (pydantic), model
# (numpy through sleepscale.data, safetensors through model.weights) and ops; `--backend fla` then
# imports fla.ops, which needs fla-core, einops and packaging. Pins: pyproject.toml and the versions
# the CPU venv resolved (pip freeze). Left out on purpose, as check.py never imports them:
# flash-linear-attention (fla.layers/fla.models, which fla imports only if present) and so
# transformers; deepspeed, megatron-core, mlflow, webdataset, tokenizers, tqdm, psutil, pyyaml.
wheels=(
    numpy==2.4.6
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0 # pydantic needs >= 4.16; torch's own may be older
    safetensors==0.8.0
    fla-core==0.6.0
    einops==0.8.2
    packaging==26.4
)

mkdir -p "$dir"
for pin in "${wheels[@]}"; do
    name=${pin%%==*} version=${pin##*==}
    stem=${name//-/_} # a wheel's file name spells the project with underscores
    # One version of each: pip refuses an install that names two (a pin changed since the last run).
    for old in "$dir/$stem"-*.whl; do
        case "$old" in "$dir/$stem-$version-"* | "$dir/$stem-*.whl") ;; *) rm -v -- "$old" ;; esac
    done
    if compgen -G "$dir/$stem-$version-*.whl" >/dev/null; then
        continue # already downloaded: a rerun needs no network
    fi
    # --no-deps: every dependency is listed above, so nothing unlisted (torch!) can come along.
    "$pip_python" -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$dir" "$pin"
done

bytes=$(cat "$dir"/*.whl | wc -c)
mib=$(((bytes + 1048575) / 1048576))
echo "bundle.sh: $dir holds $(ls "$dir"/*.whl | wc -l) wheels, $mib MiB (a device call carries at most $limit_mib MiB)"
if [ "$bytes" -gt $((limit_mib * 1048576)) ]; then
    echo "bundle.sh: $dir holds $mib MiB of wheels, over the $limit_mib MiB a device call carries; remove stray wheels from it or rerun with an empty folder" >&2
    exit 1
fi
