"""pi05 checkpoints: real (openpi/LeRobot) key names, tiny shapes, strict loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from evalkit.errors import BadInput
from evalkit.policies.pi05.checkpoint import (
    TIED_EMBEDDING,
    UNUSED_REAL_KEYS,
    save_checkpoint,
)
from evalkit.policies.pi05.policy import build
from evalkit.policies.pi05.processing import NormStats
from evalkit.policies.pi05.testing import TINY, batch, tiny_policy

STATS = {"state": {"q01": [-0.5] * 8, "q99": [0.5] * 8}, "actions": {"q01": [-2.0] * 7, "q99": [3.0] * 7}}


@pytest.fixture()
def ckpt(tmp_path):
    src = tiny_policy(seed=5)
    save_checkpoint(src.model, tmp_path / "ckpt", norm_stats=STATS)
    return src, tmp_path / "ckpt"


def load(path, **over):
    return build({**TINY, "init": "checkpoint", "checkpoint": str(path), **over}, torch.device("cpu"))


def test_real_key_names_written(ckpt):
    _, path = ckpt
    keys = set(load_file(str(path / "model.safetensors")))
    assert TIED_EMBEDDING in keys  # tied embedding appears once, under lm_head (as save_model writes it)
    assert "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight" not in keys
    for k in [
        "paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.patch_embedding.weight",
        "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias",
        "paligemma_with_expert.paligemma.model.vision_tower.vision_model.post_layernorm.weight",
        "paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight",
        "paligemma_with_expert.paligemma.model.language_model.layers.2.mlp.gate_proj.weight",
        "paligemma_with_expert.paligemma.model.language_model.norm.weight",
        "paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight",
        "paligemma_with_expert.gemma_expert.model.norm.dense.bias",
        "action_in_proj.weight", "action_out_proj.bias", "time_mlp_in.weight", "time_mlp_out.bias",
    ]:
        assert k in keys, k
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["action_horizon"] == 10 and cfg["action_dim"] == 32


def test_roundtrip_zero_missing_unexpected(ckpt):
    src, path = ckpt
    dst = load(path)
    for (n1, t1), (n2, t2) in zip(src.model.state_dict().items(), dst.model.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    # norm stats are applied: actions come out unnormalized with the checkpoint's quantiles
    a = dst.predict(batch(0), noise_seed=0)
    src.norm_stats = NormStats(state=dst.norm_stats.state, actions=None, source="test")  # same prompt, raw actions
    raw = src.predict(batch(0), noise_seed=0)
    np.testing.assert_allclose(a, (raw + 1) / 2 * (5.0 + 1e-6) - 2.0, rtol=1e-5, atol=1e-5)


def test_lerobot_prefix_and_unused_expert_head_accepted(ckpt, tmp_path):
    _, path = ckpt
    sd = load_file(str(path / "model.safetensors"))
    sd = {"model." + k: v for k, v in sd.items()}
    for k in UNUSED_REAL_KEYS:
        sd["model." + k] = torch.zeros(4, 4)
    out = tmp_path / "lerobot"
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text((path / "config.json").read_text())
    (out / "norm_stats.json").write_text(json.dumps({"norm_stats": STATS}))
    load(out)


def _rewrite(path, fn):
    sd = load_file(str(path / "model.safetensors"))
    fn(sd)
    save_file(sd, str(path / "model.safetensors"))


def test_renamed_key_fails_naming_it(ckpt):
    _, path = ckpt
    k = "paligemma_with_expert.paligemma.model.language_model.layers.1.mlp.up_proj.weight"
    _rewrite(path, lambda sd: sd.__setitem__(k.replace("up_proj", "upproj"), sd.pop(k)))
    with pytest.raises(BadInput) as e:
        load(path)
    msg = str(e.value)
    assert "model.safetensors" in msg and f"missing keys [{k}]" in msg and "layers.1.mlp.upproj.weight" in msg


def test_wrong_shape_fails_naming_it(ckpt):
    _, path = ckpt
    k = "paligemma_with_expert.gemma_expert.model.layers.0.mlp.down_proj.weight"
    _rewrite(path, lambda sd: sd.__setitem__(k, torch.zeros(3, 3)))
    with pytest.raises(BadInput, match=r"mis-shaped keys \[" + k.replace(".", r"\.") + r" \(3, 3\)"):
        load(path)


def test_no_safetensors_is_bad_input(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"pickle")
    with pytest.raises(BadInput, match="safetensors only"):
        load(tmp_path)


def test_checkpoint_tokenizer_required(ckpt):
    _, path = ckpt
    with pytest.raises(BadInput, match="SentencePiece"):
        load(path, tokenizer="checkpoint")


def test_state_tokens_checkpoint_roundtrip_with_saved_sizes(tmp_path):
    # The reference-policy path: a state_tokens model saved with its exact sizes, rebuilt by variant=checkpoint.
    over = {"prefix_inputs": "state_tokens", "state_feature_dim": 11, "state_prefix_tokens": 2}
    src = tiny_policy(**over)
    save_checkpoint(src.model, tmp_path / "ref", norm_stats=STATS)
    dst = build({"kind": "pi05", "variant": "checkpoint", "init": "checkpoint", "checkpoint": str(tmp_path / "ref"),
                 "tokenizer": "bytes", "denoise_steps": 3}, torch.device("cpu"))
    assert dst.model.cfg == src.model.cfg and dst.needs_privileged
    for (n1, t1), (n2, t2) in zip(src.model.state_dict().items(), dst.model.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    with pytest.raises(BadInput, match="disagrees"):
        build({"kind": "pi05", "variant": "checkpoint", "init": "checkpoint", "checkpoint": str(tmp_path / "ref"),
               "tokenizer": "bytes", "state_feature_dim": 12}, torch.device("cpu"))
