import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "osmesa")
REPO = Path(__file__).resolve().parent.parent


def quant_linear_reference(mod, x):
    """What a quantized Linear (evalkit.backends.quant.QuantLinear) must compute for fp32 input x, rebuilt from its
    stored tensors independently of its kernel: dequantized weights times x under the module's declared
    activation quantization. Shared by the CPU and GPU backend tests."""
    import torch
    import torch.nn.functional as F
    from evalkit.backends.quant import fake_quant_fp8_rows, quant_int8_rows

    act = mod.activation_precision
    if act.startswith("fp8"):
        xq = fake_quant_fp8_rows(x)
    elif act.startswith("int8"):
        q, s = quant_int8_rows(x)
        xq = q.float() * s[:, None]
    elif act.startswith("nvfp4"):
        from evalkit.backends.fp4 import fake_quant_nvfp4

        xq = fake_quant_nvfp4(x)
    else:
        xq = x.to(torch.bfloat16).float()
    y = F.linear(xq, mod.dequantized_weight())
    return y if mod.bias is None else y + mod.bias.float()


def run_cli(*args: str, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m evalkit ...` as a user would, in `cwd` (its mlruns/ and outputs/ land there)."""
    e = {**os.environ, "MUJOCO_GL": "osmesa", **(env or {})}
    return subprocess.run([sys.executable, "-m", "evalkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def mlflow_runs(db: Path, experiment: str = "evalkit") -> list:
    """Every run of `experiment` in the sqlite store at `db` ([] when the experiment does not exist)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []
