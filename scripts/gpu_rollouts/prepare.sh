#!/usr/bin/env bash
# Build .carry/ (git-ignored) for scripts/gpu_rollouts/run.sh, on the CPU machine from the repo root:
#   .carry/whl/         cp312 wheels of the compiled packages the GPU machine lacks (MuJoCo)
#   .carry/gl/          EGL/GL loader debs (the device README's recipe; the NVIDIA driver is already there)
#   .carry/gpu_bundle/  site.tar.xz: pure-Python packages + only the asset files the suite loads; manifest.json
# The whole .carry/ plus the working tree must stay under the device tool's 64 MiB.
set -euo pipefail
SUITE=${SUITE:-libero_spatial}
# The simulator pinned in pyproject.toml, as on the CPU machine (docs/simulator.md); build_bundle.py refuses
# a wheel or an installed robosuite that differs from the pin.
MUJOCO=$(sed -n 's/.*"mujoco==\([^"]*\)".*/\1/p' pyproject.toml)
mkdir -p .carry/whl .carry/gl /tmp/amd64/partial
rm -f .carry/whl/*.whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .carry/whl "mujoco==$MUJOCO"
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
apt-get $o update -qq
(cd .carry/gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
MUJOCO_GL=osmesa python scripts/gpu_rollouts/build_bundle.py --suite "$SUITE" --out .carry/gpu_bundle
du -sh .carry .carry/*
