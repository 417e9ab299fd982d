"""A run's key (run_key.json) names the code and the checkpoint files besides the config: a run dir never takes
episodes of other weights, other checkpoint settings or other code as its own."""

from __future__ import annotations

import json
import shutil

import pytest

from evalkit.errors import BadInput
from evalkit.policies.reference import DEFAULT_DIR
from evalkit.policies.registry import checkpoint_dir, checkpoint_identity
from evalkit.run import check_run_key


def test_checkpoint_dir_of_each_kind(tmp_path):
    assert checkpoint_dir({"kind": "reference", "checkpoint": None}) == DEFAULT_DIR
    assert checkpoint_dir({"kind": "reference", "checkpoint": str(tmp_path)}) == tmp_path
    assert checkpoint_dir({"kind": "pi05", "init": "random", "checkpoint": str(tmp_path)}) is None
    assert checkpoint_dir({"kind": "pi05", "init": "checkpoint", "checkpoint": str(tmp_path)}) == tmp_path
    assert checkpoint_dir({"kind": "noop"}) is None and checkpoint_identity({"kind": "noop"}) is None


def test_resuming_onto_a_changed_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(DEFAULT_DIR, ckpt)
    policy = {"kind": "reference", "checkpoint": str(ckpt)}
    key = {"policy": policy, "code": "abc", "checkpoint": checkpoint_identity(policy)}
    assert set(key["checkpoint"]) >= {"model.safetensors", "config.json", "assets/libero_state/norm_stats.json"}
    run = tmp_path / "run"
    check_run_key(run, key)
    check_run_key(run, {**key, "checkpoint": checkpoint_identity(policy)})  # unchanged: the run resumes
    (ckpt / "MODEL_CARD.md").write_text("edited")  # not read by the policy: still the same run
    assert checkpoint_identity(policy) == key["checkpoint"]
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["evalkit_pi05"]["pad_to_max_len"] = False  # a setting that changes actions, edited in place
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match=r"differs in: checkpoint\)"):
        check_run_key(run, {**key, "checkpoint": checkpoint_identity(policy)})
    with pytest.raises(BadInput, match=r"differs in: code\)"):
        check_run_key(run, {**key, "code": "def"})


def test_large_weights_are_sampled_not_read_whole(tmp_path, monkeypatch):
    import evalkit.policies.registry as registry

    monkeypatch.setattr(registry, "HASHED_UP_TO", 1024)
    (tmp_path / "model.safetensors").write_bytes(bytes(4 << 20))
    policy = {"kind": "pi05", "init": "checkpoint", "checkpoint": str(tmp_path)}
    first = checkpoint_identity(policy)["model.safetensors"]
    assert first.startswith("sampled:")
    with (tmp_path / "model.safetensors").open("r+b") as f:  # a change in the middle MiB
        f.seek(2 << 20)
        f.write(b"\x01")
    assert checkpoint_identity(policy)["model.safetensors"] != first
