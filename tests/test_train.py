"""evalkit.train: packing (chunk indices, stats) and a few CPU steps on a tiny synthetic set (loss goes down)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evalkit.errors import BadInput
from evalkit.train import chunk_indices, fit, load_config, pack


def test_chunk_indices_repeat_last_step_per_episode():
    idx = chunk_indices([3, 2], horizon=4)
    assert idx.tolist() == [[0, 1, 2, 2], [1, 2, 2, 2], [2, 2, 2, 2], [3, 4, 4, 4], [4, 4, 4, 4]]


def _fake_episodes(d, n=6, steps=30, seed=0):
    """Synthetic episodes whose actions are a fixed function of the features (learnable)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(29, 7)) * 0.3
    for i in range(n):
        f = rng.normal(size=(steps, 29)).astype(np.float32)
        a = np.tanh(f @ w).astype(np.float32)
        np.savez(d / f"task00_ep{i:04d}.npz", features=f, actions=a, state=f[:, :8],
                 instruction=np.array(["pick up the thing" if i % 2 else "place the other thing"]))


def test_config_overrides_and_unknown_key():
    cfg = load_config(["steps=3", "model.prefix.width=32"])
    assert cfg["steps"] == 3 and cfg["model"]["prefix"]["width"] == 32 and cfg["horizon"] == 10
    with pytest.raises(BadInput):
        load_config(["no_such_key=1"])


def test_training_reduces_loss_and_writes_checkpoint(tmp_path):
    (tmp_path / "eps").mkdir()
    _fake_episodes(tmp_path / "eps")
    size = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}
    cfg = load_config([f"data=[{tmp_path / 'eps'}]", f"packed={tmp_path / 'p.npz'}", f"out={tmp_path / 'ckpt'}",
                       "steps=120", "batch_size=32", "lr=0.003", "warmup=10", "log_every=1000", "device=cpu",
                       "val_fraction=0.2"])
    cfg["model"]["prefix"] = dict(size)
    cfg["model"]["expert"] = dict(size)
    packed = np.load(pack(cfg))
    assert packed["features"].shape == (180, 29) and packed["chunks"].shape == (180, 10)
    assert len(packed["instructions"]) == 2
    summary = fit(cfg)
    first, last = summary["log"][0]["val_loss"], summary["log"][-1]["val_loss"]
    assert summary["steps_done"] == 120
    assert last < 0.8 * first, (first, last)
    out = tmp_path / "ckpt"
    assert (out / "model.safetensors").is_file() and (out / "train_config.yaml").is_file()
    stats = json.loads(next(out.rglob("norm_stats.json")).read_text())["norm_stats"]
    assert set(stats) >= {"state", "actions", "features"}
