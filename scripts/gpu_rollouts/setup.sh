#!/usr/bin/env bash
# Sourced by run.sh and first_obs.sh on the GPU machine, from the repo root: EGL loaders, the bundle's
# packages after the interpreter's own, MUJOCO_GL=egl. Sets t0 (start time); returns 2 when broken.
B=.carry/gpu_bundle
SITE=/tmp/evalkit_site
t0=$(date +%s)

# 1. EGL: the machine has the NVIDIA driver but not the GL vendor-neutral loaders (device README).
for f in .carry/gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export __EGL_VENDOR_LIBRARY_FILENAMES=${__EGL_VENDOR_LIBRARY_FILENAMES:-/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json}
[ -f "$__EGL_VENDOR_LIBRARY_FILENAMES" ] || unset __EGL_VENDOR_LIBRARY_FILENAMES

# 2. The bundle: pure-Python packages + the suite's assets, and cp312 wheels for what is compiled.
mkdir -p "$SITE"
tar -xJf "$B/site.tar.xz" -C "$SITE" || { echo "bundle: cannot unpack"; return 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .carry/whl/*.whl || return 2
# After the interpreter's own site-packages: its numpy, scipy, Pillow and torch win; the bundle fills gaps.
PURELIB=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$SITE" > "$PURELIB/zz_evalkit_bundle.pth"
export PYTHONPATH=$PWD MUJOCO_GL=egl PYOPENGL_PLATFORM=egl PYTHONUNBUFFERED=1
echo "setup: $(( $(date +%s) - t0 )) s; python $(python3 -V 2>&1); $(nproc) cores"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 - <<'EOF' || return 2
import importlib
for m in ("numpy", "scipy", "PIL", "torch", "mujoco", "robosuite", "libero.libero", "numba", "hydra", "pandas", "pyarrow"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m:14s} {getattr(mod, '__version__', '')}  {getattr(mod, '__file__', '')}")
    except Exception as e:
        print(f"  {m:14s} MISSING ({type(e).__name__}: {e})")
EOF
# robosuite's numba path (the bundle's robosuite/macros_private.py turns it on): numba and llvmlite come from
# the image, not the bundle (llvmlite alone is ~40 MB). Without them this machine would run a slower physics
# path whose last bits differ from the CPU reference (docs/simulator.md), so setup stops with one line.
python3 - <<'EOF' || return 2
import sys
try:
    import llvmlite
    import numba
    from numba.core.dispatcher import Dispatcher
    import robosuite.macros as macros
    import robosuite.utils.transform_utils as T
except Exception as e:  # noqa: BLE001
    sys.exit(f"setup: robosuite's numba path needs numba + llvmlite from this machine's image: {type(e).__name__}: {e}")
if not (macros.ENABLE_NUMBA and isinstance(T.mat2quat, Dispatcher)):
    sys.exit(f"setup: robosuite's numba path is off here (ENABLE_NUMBA={macros.ENABLE_NUMBA}, mat2quat is "
             f"{type(T.mat2quat).__name__}); rebuild the bundle with scripts/gpu_rollouts/prepare.sh")
print(f"  robosuite numba path on: numba {numba.__version__}, llvmlite {llvmlite.__version__}")
EOF

