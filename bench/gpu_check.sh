#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a machine with one NVIDIA GPU, Python 3.12, JAX with its CUDA plugin and
# torch installed, and no network: installs cloc_jax from a wheelhouse made here by bench/make_wheelhouse.sh,
# then runs the check within 8 minutes. One JSON line per measurement; exit 1 when a check fails (124: too slow).
#
#   bash bench/gpu_check.sh WHEELHOUSE [bench/gpu_check.py flags]
#   bash bench/gpu_check.sh --installed [flags]      # cloc_jax already installed (e.g. this CPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
source=${1:?usage: bash bench/gpu_check.sh WHEELHOUSE|--installed [flags]}
shift
if [ "$source" != "--installed" ]; then
  # --no-deps: the machine's own jax, torch, flax, optax, orbax and transformers stay as they are
  python3 -m pip install -q --no-index --no-deps --no-compile "$source"/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
exec timeout 480 python3 bench/gpu_check.py "$@"
