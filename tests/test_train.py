"""evalkit.train: packing (chunk indices, stats) and a few CPU steps on a tiny synthetic set (loss goes down)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evalkit.errors import BadInput
from evalkit.policies.reference import FEATURE_DIM
from evalkit.train import chunk_indices, fit, load_config, pack


def test_chunk_indices_repeat_last_step_per_episode():
    idx = chunk_indices([3, 2], horizon=4)
    assert idx.tolist() == [[0, 1, 2, 2], [1, 2, 2, 2], [2, 2, 2, 2], [3, 4, 4, 4], [4, 4, 4, 4]]


def _fake_episodes(d, n=6, steps=30, seed=0, image_size=0):
    """Synthetic episodes in `python -m evalkit.demos`'s format (privileged arrays p:*, the planner's stage:*,
    optional camera frames) whose actions are a fixed function of the eef-to-command offset (learnable)."""
    rng = np.random.default_rng(seed)
    quat = np.tile([0.0, 0.0, 0.0, 1.0], (steps, 1)).astype(np.float32)
    for i in range(n):
        eef = rng.normal(size=(steps, 3)).astype(np.float32) * 0.1
        cmd = rng.normal(size=(steps, 3)).astype(np.float32) * 0.1
        a = np.zeros((steps, 7), np.float32)
        a[:, :3] = np.tanh((cmd - eef) * 10)
        a[:, 6] = np.where(cmd[:, 0] > 0, 1.0, -1.0)
        arrays = {
            "p:robot0_eef_pos": eef, "p:robot0_eef_quat": quat, "p:robot0_gripper_qpos": np.zeros((steps, 2), np.float32),
            "p:thing_1_pos": eef + 0.05, "p:thing_1_quat": quat, "p:plate_1_pos": eef - 0.05,
            "stage:skill": np.array(["pick_place"] * steps), "stage:phase_index": rng.integers(0, 8, steps),
            "stage:obj": np.array(["thing_1"] * steps), "stage:target": np.array(["plate_1"] * steps),
            "stage:command": np.concatenate([cmd, quat, a[:, 6:7]], axis=1),
            "actions": a, "state": np.concatenate([eef, np.zeros((steps, 5), np.float32)], axis=1),
            "instruction": np.array(["pick up the thing" if i % 2 else "place the other thing"]),
        }
        if image_size:
            for cam in ("agentview", "wrist"):
                arrays[cam] = rng.integers(0, 255, (steps, image_size, image_size, 3), dtype=np.uint8)
        np.savez(d / f"task00_ep{i:04d}.npz", **arrays)


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
    assert packed["features"].shape == (180, FEATURE_DIM) and packed["chunks"].shape == (180, 10)
    assert len(packed["instructions"]) == 2
    summary = fit(cfg)
    first, last = summary["log"][0]["val_loss"], summary["log"][-1]["val_loss"]
    assert summary["steps_done"] == 120
    assert last < 0.8 * first, (first, last)
    out = tmp_path / "ckpt"
    assert (out / "model.safetensors").is_file() and (out / "train_config.yaml").is_file()
    stats = json.loads(next(out.rglob("norm_stats.json")).read_text())["norm_stats"]
    assert set(stats) >= {"state", "actions", "features"}
    # resuming (init_from) starts from the saved weights: after one tiny warm-up step its validation loss is the
    # last run's final one, not a fresh model's
    again = fit({**cfg, "init_from": str(out), "out": str(tmp_path / "ckpt2"), "steps": 1})
    assert abs(again["log"][0]["val_loss"] - last) < 0.05 * (first - last)
    with pytest.raises(BadInput, match="init_from"):
        fit({**cfg, "init_from": str(out), "model": {**cfg["model"], "prefix": {**size, "width": 64}}})


def test_ema_checkpoint_is_the_moving_average_not_the_last_step(tmp_path):
    """ema_decay=1.0 freezes the average at its first update (the weights after step 1): a 3-step run then saves
    exactly what a 1-step run saves, and different weights from its own last step."""
    from safetensors.numpy import load_file

    (tmp_path / "eps").mkdir()
    _fake_episodes(tmp_path / "eps", n=4, steps=12)
    size = {"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}
    base = load_config([f"data=[{tmp_path / 'eps'}]", f"packed={tmp_path / 'p.npz'}", "batch_size=8",
                        "lr=0.003", "warmup=1", "log_every=1000", "device=cpu", "val_fraction=0.25"])
    base["model"]["prefix"], base["model"]["expert"] = dict(size), dict(size)
    runs = {"one": (1, 0), "ema": (3, 1.0), "last": (3, 0)}
    weights = {}
    for name, (steps, decay) in runs.items():
        fit({**base, "steps": steps, "ema_decay": decay, "out": str(tmp_path / name)})
        weights[name] = load_file(str(tmp_path / name / "model.safetensors"))
    assert all(np.array_equal(weights["one"][k], weights["ema"][k]) for k in weights["one"])
    assert any(not np.array_equal(weights["last"][k], weights["ema"][k]) for k in weights["one"])
    with pytest.raises(BadInput, match="ema_decay"):
        fit({**base, "steps": 1, "ema_decay": 1.5, "out": str(tmp_path / "bad")})


def test_image_training_writes_a_checkpoint_that_reference_vision_builds(tmp_path):
    """The images path: frames packed per step, per-sample prompts with the binned state, a checkpoint that
    policy=reference_vision loads and runs on two 32-pixel views."""
    import torch

    from evalkit.policies.base import ObsBatch, Observation
    from evalkit.policies.registry import build_policy

    (tmp_path / "eps").mkdir()
    _fake_episodes(tmp_path / "eps", n=4, steps=12, image_size=32)
    size = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}
    cfg = load_config(["config=conf/train/reference_vision.yaml", f"data=[{tmp_path / 'eps'}]",
                       f"packed={tmp_path / 'p.npz'}", f"out={tmp_path / 'ckpt'}", "steps=3", "batch_size=4",
                       "log_every=1000", "device=cpu", "val_fraction=0.25", "augment_shift=2", "amp=true",
                       "compile=false"])
    cfg["model"].update(prefix=dict(size), expert=dict(size),
                        vision={"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2, "patch_size": 8,
                                "image_size": 32})
    packed = np.load(pack(cfg))
    assert packed["images"].shape == (48, 2, 32, 32, 3) and packed["images"].dtype == np.uint8
    assert "features" not in packed.files
    summary = fit(cfg)
    assert summary["steps_done"] == 3 and np.isfinite(summary["log"][-1]["val_loss"])
    policy = build_policy({"kind": "reference_vision", "checkpoint": str(tmp_path / "ckpt"), "denoise_steps": 2},
                          torch.device("cpu"))
    assert policy.name == "reference_vision" and policy.needs_images and not policy.needs_privileged
    img = np.zeros((32, 32, 3), np.uint8)
    obs = Observation(state=np.zeros(8, np.float32), instruction="pick up the thing", episode_key="e", step=0,
                      agentview=img, wrist=img)
    a = policy.predict(ObsBatch([obs]), noise_seed=0)
    assert a.shape == (1, 10, 7) and np.isfinite(a).all()


def test_compiled_training_takes_the_eager_steps_in_one_graph(tmp_path, capsys):
    """compile=true (conf/train/reference_vision.yaml) trains exactly what eager training trains, from one graph:
    a recompile (a Python int on the model bumped per call, a per-batch prompt length) would be an error here,
    where outside a test it silently costs the speed back."""
    import torch

    (tmp_path / "eps").mkdir()
    _fake_episodes(tmp_path / "eps", n=4, steps=12, image_size=32)
    size = {"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}
    base = load_config(["config=conf/train/reference_vision.yaml", f"data=[{tmp_path / 'eps'}]",
                        f"packed={tmp_path / 'p.npz'}", "steps=6", "batch_size=4", "log_every=2", "device=cpu",
                        "val_fraction=0.25", "augment_shift=2", "amp=false", "ema_decay=0"])
    base["model"].update(prefix=dict(size), expert=dict(size),
                         vision={"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2, "patch_size": 8,
                                 "image_size": 32})
    eager = fit({**base, "compile": False, "out": str(tmp_path / "eager")})
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = fit({**base, "compile": True, "out": str(tmp_path / "compiled")})
    assert "training eager" not in capsys.readouterr().out
    for a, b in zip(eager["log"], compiled["log"]):
        assert a.get("loss") == pytest.approx(b.get("loss"), rel=1e-4, abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_image_training_refuses_state_only_episodes(tmp_path):
    (tmp_path / "eps").mkdir()
    _fake_episodes(tmp_path / "eps", n=2)
    cfg = load_config(["config=conf/train/reference_vision.yaml", f"data=[{tmp_path / 'eps'}]",
                       f"packed={tmp_path / 'p.npz'}", f"out={tmp_path / 'ckpt'}", "device=cpu"])
    with pytest.raises(BadInput, match="images=true"):
        pack(cfg)


def test_time_limited_run_fits_its_schedule_to_the_time_left(tmp_path, monkeypatch):
    """max_seconds lays the lr schedule over the steps that fit, timed after the warm-up steps: with a clock
    where the first step costs 20 s and every later one 50 ms, a 40 s run schedules 200 + (40*0.97 - 29.95)/0.05 = 377
    steps (timing the first 200 steps whole would plan 259) and ends by that schedule (annealed), not by the limit."""
    import types

    import evalkit.train as train

    (tmp_path / "eps").mkdir()
    _fake_episodes(tmp_path / "eps", n=2, steps=12)
    size = {"width": 16, "depth": 1, "mlp_dim": 32, "num_heads": 1, "num_kv_heads": 1, "head_dim": 16}
    cfg = load_config([f"data=[{tmp_path / 'eps'}]", f"packed={tmp_path / 'p.npz'}", f"out={tmp_path / 'c'}",
                       "steps=100000", "batch_size=4", "log_every=100000", "device=cpu", "max_seconds=40"])
    cfg["model"]["prefix"], cfg["model"]["expert"] = dict(size), dict(size)
    clock = {"now": 0.0, "steps": 0}

    def now() -> float:
        return clock["now"]

    import torch

    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        clock["now"] += 20.0 if clock["steps"] == 0 else 0.05
        clock["steps"] += 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=now))
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    summary = train.fit(cfg)
    expected = 200 + int((40 * 0.97 - (20 + 199 * 0.05)) / 0.05)
    assert abs(summary["steps_scheduled"] - expected) <= 2, summary["steps_scheduled"]
    assert summary["steps_done"] == summary["steps_scheduled"]
