#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs on a GPU machine that has Python 3.12, JAX with its CUDA plugin, torch,
# flax, optax, orbax, transformers and timm, and no network: only what such a machine lacks (cloc_jax's other
# requirements, open_clip_torch for the comparison, and their own needs), for Linux x86_64.
#
#   bash bench/make_wheelhouse.sh [DIR]      # default .whl/ (git-ignored); about 20 MB
set -euo pipefail
out=${1:-.whl}
mkdir -p "$out"
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
# Each name's own requirements, minus what the GPU machine has, are in this list too (pip download --no-deps).
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d "$out" \
  grain array_record portpicker "tensorflow-datasets>=4.9" dm-tree immutabledict simple-parsing docstring_parser \
  tensorflow-metadata googleapis-common-protos termcolor toml importlib_resources "ml_collections>=1.0" \
  tensorboardX "ftfy>=6" wcwidth "pycocotools>=2.0.7" "open_clip_torch>=3.0"
pip wheel -q --no-deps -w "$out" promise  # a pure-Python sdist only (tensorflow-datasets needs it)
du -sh "$out"
