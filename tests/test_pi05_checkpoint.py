"""pi05 checkpoints: real (openpi/LeRobot) key names, tiny shapes, strict loading; both forms of the tied
embedding; the checkpoint's precision; a checkpoint laid out as openpi writes it, generated from openpi's module
structure (independently of evalkit's name mapping): tiny on the CPU, true size (813 names) on a GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from evalkit.errors import BadInput
from evalkit.policies.pi05.checkpoint import (
    EMBEDDING,
    TIED_EMBEDDING,
    UNUSED_REAL_KEYS,
    expected_shapes,
    real_name,
    save_checkpoint,
)
from evalkit.policies.pi05.config import full_config, tiny_config
from evalkit.policies.pi05.policy import build, precheck
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


# ---------------------------------------------------------------------------------------------- tied embedding
def test_openpi_form_lm_head_only_loads(ckpt):
    src, path = ckpt
    dst = load(path)
    assert dst.load_report["tied_embedding"] == "lm_head"
    assert torch.equal(dst.model.prefix.embed_tokens.weight, src.model.prefix.embed_tokens.weight)


def test_embed_tokens_only_form_loads(ckpt):
    src, path = ckpt
    _rewrite(path, lambda sd: sd.__setitem__(EMBEDDING, sd.pop(TIED_EMBEDDING)))
    dst = load(path)
    assert dst.load_report["tied_embedding"] == "embed_tokens"
    assert torch.equal(dst.model.prefix.embed_tokens.weight, src.model.prefix.embed_tokens.weight)


def test_both_tied_names_equal_load(ckpt):
    src, path = ckpt
    _rewrite(path, lambda sd: sd.__setitem__(EMBEDDING, sd[TIED_EMBEDDING].clone()))
    assert {EMBEDDING, TIED_EMBEDDING} <= set(load_file(str(path / "model.safetensors")))
    dst = load(path)
    assert dst.load_report["tied_embedding"] == "both (equal)"
    assert torch.equal(dst.model.prefix.embed_tokens.weight, src.model.prefix.embed_tokens.weight)


def test_both_tied_names_different_refused_naming_the_twin(ckpt):
    _, path = ckpt

    def differ(sd):
        sd[EMBEDDING] = sd[TIED_EMBEDDING].clone()
        sd[EMBEDDING][37, 3] += 0.5

    _rewrite(path, differ)
    precheck({**TINY, "init": "checkpoint", "checkpoint": str(path)})  # header-only: shapes agree
    with pytest.raises(BadInput) as e:
        load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path / "model.safetensors") in msg
    assert f"{TIED_EMBEDDING} is the tied twin of {EMBEDDING}" in msg and "row 37" in msg and "0.5" in msg


def test_both_tied_names_twin_misshaped_refused_before_any_model(ckpt):
    _, path = ckpt

    def misshape(sd):
        sd[EMBEDDING] = sd[TIED_EMBEDDING].clone()
        sd[TIED_EMBEDDING] = sd[TIED_EMBEDDING][:-1].clone()

    _rewrite(path, misshape)
    with pytest.raises(BadInput, match=r"mis-shaped keys \[" + TIED_EMBEDDING.replace(".", r"\.") + r" \(the tied twin"):
        precheck({**TINY, "init": "checkpoint", "checkpoint": str(path)})


def test_neither_tied_name_is_a_missing_key_naming_both(ckpt):
    _, path = ckpt
    _rewrite(path, lambda sd: sd.pop(TIED_EMBEDDING))
    with pytest.raises(BadInput, match=f"missing keys \\[{EMBEDDING} \\(or its tied twin {TIED_EMBEDDING}\\)\\]"):
        load(path)


# ---------------------------------------------------------------------------------------------- precision
def test_checkpoint_precision_is_used_unless_dtype_is_set(tmp_path):
    src = tiny_policy(seed=3)
    src.model.to(torch.bfloat16)
    save_checkpoint(src.model, tmp_path / "bf16", norm_stats=STATS)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bfloat16"
    dst = load(tmp_path / "bf16")
    assert {p.dtype for p in dst.model.parameters()} == {torch.bfloat16}
    assert dst.load_report["dtype"] == "bfloat16" and dst.load_report["dtype_source"].endswith("config.json precision")
    assert np.isfinite(dst.predict(batch(0), noise_seed=0)).all()
    over = load(tmp_path / "bf16", dtype="float32")
    assert {p.dtype for p in over.model.parameters()} == {torch.float32}
    assert over.load_report["dtype_source"] == "policy.dtype"
    for (n, a), b in zip(src.model.state_dict().items(), over.model.state_dict().values()):
        assert torch.equal(a.float(), b), n  # bf16 -> float32 is exact


def test_random_init_defaults_to_float32_and_bad_dtype_is_refused():
    assert {p.dtype for p in tiny_policy().model.parameters()} == {torch.float32}
    with pytest.raises(BadInput, match=r"pi05 dtype must be one of \['bfloat16', 'float16', 'float32'\]"):
        tiny_policy(dtype="fp8")


# ---------------------------------------------------------------------------------------------- openpi's layout
def openpi_layout(cfg) -> dict[str, tuple[int, ...]]:
    """Names and shapes of openpi's PI0Pytorch (pi05) state dict, written from openpi's modules (HF PaliGemma with
    a SigLIP tower and no pooling head; a Gemma expert with adaRMS norms, whose embed_tokens openpi removes), not
    from evalkit's name mapping. Includes both names of the tied embedding, as the module holds them."""
    pg, ex, v, p, e = "paligemma_with_expert.paligemma.", "paligemma_with_expert.gemma_expert.", cfg.vision, \
        cfg.prefix, cfg.expert
    vt = pg + "model.vision_tower.vision_model."
    out = {vt + "embeddings.patch_embedding.weight": (v.width, 3, v.patch_size, v.patch_size),
           vt + "embeddings.patch_embedding.bias": (v.width,),
           vt + "embeddings.position_embedding.weight": ((v.image_size // v.patch_size) ** 2, v.width),
           vt + "post_layernorm.weight": (v.width,), vt + "post_layernorm.bias": (v.width,),
           pg + "model.multi_modal_projector.linear.weight": (p.width, v.width),
           pg + "model.multi_modal_projector.linear.bias": (p.width,)}
    for i in range(v.depth):
        b = f"{vt}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{b}self_attn.{proj}.weight"], out[f"{b}self_attn.{proj}.bias"] = (v.width, v.width), (v.width,)
        for ln in ("layer_norm1", "layer_norm2"):
            out[f"{b}{ln}.weight"], out[f"{b}{ln}.bias"] = (v.width,), (v.width,)
        out[f"{b}mlp.fc1.weight"], out[f"{b}mlp.fc1.bias"] = (v.mlp_dim, v.width), (v.mlp_dim,)
        out[f"{b}mlp.fc2.weight"], out[f"{b}mlp.fc2.bias"] = (v.width, v.mlp_dim), (v.width,)

    def gemma(base: str, g, adaptive: bool) -> None:
        norm = (lambda n: {f"{n}.dense.weight": (3 * g.width, g.width), f"{n}.dense.bias": (3 * g.width,)}) \
            if adaptive else (lambda n: {f"{n}.weight": (g.width,)})
        for i in range(g.depth):
            b = f"{base}layers.{i}."
            out[b + "self_attn.q_proj.weight"] = (g.num_heads * g.head_dim, g.width)
            out[b + "self_attn.k_proj.weight"] = (g.num_kv_heads * g.head_dim, g.width)
            out[b + "self_attn.v_proj.weight"] = (g.num_kv_heads * g.head_dim, g.width)
            out[b + "self_attn.o_proj.weight"] = (g.width, g.num_heads * g.head_dim)
            out[b + "mlp.gate_proj.weight"] = out[b + "mlp.up_proj.weight"] = (g.mlp_dim, g.width)
            out[b + "mlp.down_proj.weight"] = (g.width, g.mlp_dim)
            out.update(norm(b + "input_layernorm"))
            out.update(norm(b + "post_attention_layernorm"))
        out.update(norm(base + "norm"))

    gemma(pg + "model.language_model.", p, adaptive=False)
    out[pg + "model.language_model.embed_tokens.weight"] = out[pg + "lm_head.weight"] = (cfg.vocab_size, p.width)
    gemma(ex + "model.", e, adaptive=True)
    out[ex + "lm_head.weight"] = (cfg.vocab_size, e.width)
    out["action_in_proj.weight"], out["action_in_proj.bias"] = (e.width, cfg.action_dim), (e.width,)
    out["action_out_proj.weight"], out["action_out_proj.bias"] = (cfg.action_dim, e.width), (cfg.action_dim,)
    for n in ("time_mlp_in", "time_mlp_out"):
        out[f"{n}.weight"], out[f"{n}.bias"] = (e.width, e.width), (e.width,)
    return out


FLOAT32_IN_OPENPI = ("action_in_proj.", "action_out_proj.", "time_mlp_in.", "time_mlp_out.")


def write_openpi_checkpoint(out, cfg, both_tied: bool = False, seed: int = 0):
    """A checkpoint as openpi's converter writes it: safetensors with the tied embedding under lm_head only (or both
    names, equal), projections float32 and the rest bfloat16, config.json, assets/<id>/norm_stats.json. Random
    values (std 0.02; norm weights small) so activations stay finite."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in openpi_layout(cfg).items():
        if name == EMBEDDING:
            continue
        dtype = torch.float32 if name.startswith(FLOAT32_IN_OPENPI) else torch.bfloat16
        tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    if both_tied:
        tensors[EMBEDDING] = tensors[TIED_EMBEDDING].clone()
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"action_dim": cfg.action_dim, "action_horizon": cfg.action_horizon,
                                                 "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m",
                                                 "precision": "bfloat16"}))
    (out / "assets" / "physical-intelligence" / "libero").mkdir(parents=True)
    stats = {k: {"mean": [0.0] * n, "std": [1.0] * n, "q01": [-1.0] * n, "q99": [1.0] * n}
             for k, n in (("state", 8), ("actions", 7))}
    (out / "assets" / "physical-intelligence" / "libero" / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    return tensors


def test_true_size_names_and_shapes_match_openpi_layout():
    """At true size, without any tensor: our parameters, under their file names, are openpi's 813 names less the
    expert's unused lm_head and one of the tied pair, with the same shapes."""
    full = openpi_layout(full_config())
    assert len(full) == 813  # openpi's PI0Pytorch(pi05) state dict, both tied names included
    ours = {real_name(k): v for k, v in expected_shapes(full_config()).items()}
    assert ours == {k: v for k, v in full.items() if k not in UNUSED_REAL_KEYS | {TIED_EMBEDDING}}
    assert full[TIED_EMBEDDING] == full[EMBEDDING] == (257152, 2048)


@pytest.mark.parametrize("both_tied", [False, True], ids=["openpi_save_model", "both_tied_names"])
def test_tiny_openpi_layout_checkpoint_loads_every_tensor_where_it_belongs(tmp_path, both_tied):
    cfg = tiny_config()
    tensors = write_openpi_checkpoint(tmp_path / "ck", cfg, both_tied=both_tied)
    pol = build({**TINY, "init": "checkpoint", "checkpoint": str(tmp_path / "ck"), "state_in_prompt": False},
                torch.device("cpu"))
    assert pol.load_report["dtype"] == "bfloat16" and {p.dtype for p in pol.model.parameters()} == {torch.bfloat16}
    assert pol.load_report["tied_embedding"] == ("both (equal)" if both_tied else "lm_head")
    assert pol.load_report["ignored_unused"] == ["paligemma_with_expert.gemma_expert.lm_head.weight"]
    # every file tensor (but the unused expert head) sits in exactly one parameter, found by value, not by name
    params = dict(pol.model.state_dict())
    unmatched = dict(params)
    for name, t in tensors.items():
        if name in UNUSED_REAL_KEYS or name == EMBEDDING:
            continue
        hits = [n for n, p in unmatched.items() if p.shape == t.shape and torch.equal(p, t.to(torch.bfloat16))]
        assert len(hits) == 1, (name, hits)
        del unmatched[hits[0]]
    assert not unmatched
    assert torch.equal(params["prefix.embed_tokens.weight"], tensors[TIED_EMBEDDING])
    assert torch.equal(params["action_in_proj.weight"], tensors["action_in_proj.weight"].to(torch.bfloat16))
    a = pol.predict(batch(0), noise_seed=0)
    assert a.shape == (1, 10, 7) and np.isfinite(a).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("both_tied", [False, True], ids=["openpi_save_model", "both_tied_names"])
def test_true_size_openpi_layout_checkpoint_loads_on_gpu(tmp_path, both_tied):
    """openpi's 813 names at true size (812 in the file as save_model writes it; 813 with both tied names),
    generated here, never committed (~7 GB)."""
    import time

    cfg = full_config()
    write_openpi_checkpoint(tmp_path / "ck", cfg, both_tied=both_tied)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pol = build({"kind": "pi05", "variant": "full", "init": "checkpoint", "checkpoint": str(tmp_path / "ck"),
                 "tokenizer": "bytes", "denoise_steps": 3}, torch.device("cuda"))
    load_s = time.perf_counter() - t0
    assert pol.load_report["loaded"] == len(pol.model.state_dict())
    assert pol.load_report["tied_embedding"] == ("both (equal)" if both_tied else "lm_head")
    assert {p.dtype for p in pol.model.parameters()} == {torch.bfloat16}  # config.json says bfloat16
    a = pol.predict(batch(0), noise_seed=0)
    assert a.shape == (1, 10, 7) and np.isfinite(a).all()
    print(f"true-size openpi layout ({'both tied names' if both_tied else 'save_model'}): load {load_s:.1f} s, "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
