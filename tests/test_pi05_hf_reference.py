"""Cross-check against Hugging Face's PaliGemma / Gemma / SigLIP modules (what openpi's checkpoints are built from).

Skipped when `transformers` is not installed (dev-only). Checks, with tiny shapes and random weights:
- our checkpoint names are exactly HF PaliGemma's parameter names (plus openpi's prefix) and, for the expert,
  HF Gemma's (except the adaRMS norms, which openpi adds in its patched modules);
- loading an HF-named checkpoint gives the same SigLIP features, projector output and prefix K/V cache
  (what the expert attends to) as HF's own forward, after undoing the two scalings openpi's patched
  modules remove (PaliGemma's 1/sqrt(width) on image features, Gemma's sqrt(width) on inputs_embeds).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import GemmaForCausalLM, PaliGemmaForConditionalGeneration  # noqa: E402
from transformers.models.auto import CONFIG_MAPPING  # noqa: E402

from evalkit.policies.pi05 import Pi05Model, tiny_config  # noqa: E402
from evalkit.policies.pi05.checkpoint import EXPERT, PG, load_state_dict_into, real_name  # noqa: E402


def hf_paligemma(cfg):
    pc = CONFIG_MAPPING["paligemma"]()
    t, v = pc.text_config, pc.vision_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = cfg.prefix.width, cfg.prefix.mlp_dim, cfg.prefix.depth
    t.num_attention_heads, t.num_key_value_heads = cfg.prefix.num_heads, cfg.prefix.num_kv_heads
    t.head_dim = cfg.prefix.head_dim
    t.vocab_size, pc._vocab_size, t.hidden_activation = cfg.vocab_size, cfg.vocab_size, "gelu_pytorch_tanh"
    v.hidden_size, v.intermediate_size, v.num_hidden_layers = cfg.vision.width, cfg.vision.mlp_dim, cfg.vision.depth
    v.num_attention_heads, v.patch_size = cfg.vision.num_heads, cfg.vision.patch_size
    v.image_size = cfg.vision.image_size
    v.projection_dim = pc.projection_dim = cfg.prefix.width
    pc._attn_implementation = t._attn_implementation = v._attn_implementation = "eager"
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(pc).eval()
    with torch.no_grad():  # HF inits norms to 0/1 and some biases to 0: randomize so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_expert(cfg):
    e = cfg.expert
    gc = CONFIG_MAPPING["gemma"](head_dim=e.head_dim, hidden_size=e.width, intermediate_size=e.mlp_dim,
                                 num_attention_heads=e.num_heads, num_hidden_layers=e.depth,
                                 num_key_value_heads=e.num_kv_heads, vocab_size=cfg.vocab_size)
    return GemmaForCausalLM(gc)


def test_names_match_hf_modules():
    cfg = tiny_config()
    ours = {real_name(k) for k in Pi05Model(cfg).state_dict()}
    pg = {PG + k for k in hf_paligemma(cfg).state_dict()}
    assert pg - ours == {PG + "lm_head.weight"}  # tied with embed_tokens: one of the two names in a file
    assert {k for k in ours if k.startswith(PG)} == pg - {PG + "lm_head.weight"}
    ex = {EXPERT + k for k in hf_expert(cfg).state_dict()}
    ours_ex = {k for k in ours if k.startswith(EXPERT)}
    plain = lambda keys: {k for k in keys if "layernorm" not in k and not k.endswith("norm.weight")  # noqa: E731
                          and "norm.dense" not in k}
    assert plain(ex) - plain(ours_ex) == {EXPERT + "lm_head.weight", EXPERT + "model.embed_tokens.weight"}
    assert plain(ours_ex) <= plain(ex)


def test_hf_named_checkpoint_reproduces_hf_forward(tmp_path):
    cfg = tiny_config()
    hf = hf_paligemma(cfg)
    ours = Pi05Model(cfg).eval()
    ours.init_random(seed=1)
    sd = {PG + k: v.contiguous() for k, v in hf.state_dict().items()
          if k != "model.language_model.embed_tokens.weight"}  # tied: stored once, as lm_head (save_model's choice)
    for k, v in ours.state_dict().items():
        if not real_name(k).startswith(PG):
            sd[real_name(k)] = v
    save_file(sd, str(tmp_path / "model.safetensors"))
    report = load_state_dict_into(ours, tmp_path)
    assert report["loaded"] == len(ours.state_dict())

    pixels = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        feats_hf = hf.model.vision_tower(pixels).last_hidden_state
        feats = ours.vision(pixels)
        torch.testing.assert_close(feats, feats_hf, rtol=1e-4, atol=1e-4)
        # openpi's patched PaliGemma drops HF's 1/sqrt(width) image scaling: compare the projector itself
        torch.testing.assert_close(ours.projector(feats), hf.model.multi_modal_projector(feats_hf),
                                   rtol=1e-4, atol=1e-4)

        tokens = torch.randint(3, cfg.vocab_size, (2, 7))
        embs, mask = ours.embed_prefix(tokens, None, images=pixels[:, None])
        p = embs.shape[1]
        # stock HF Gemma multiplies inputs_embeds by sqrt(width); openpi's patched Gemma does not (its
        # embed_prefix scales only the language embeddings): undo HF's factor to compare the same function
        out = hf.model.language_model(inputs_embeds=embs / cfg.prefix.width**0.5,
                                      attention_mask=torch.zeros(2, 1, p, p),
                                      position_ids=torch.arange(p)[None].expand(2, p), use_cache=True)
        cache = ours.prefill(embs, mask)
        for i in range(cfg.prefix.depth):
            k_hf, v_hf = out.past_key_values[i]
            k, v = cache.kv[i]
            torch.testing.assert_close(k[:, :, :p], k_hf, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v[:, :, :p], v_hf, rtol=1e-4, atol=1e-4)
        # and the whole prefix stack's output (final norm included)
        from evalkit.policies.pi05.layers import AttnContext, rope_tables

        cos, sin = rope_tables(torch.arange(p)[None].expand(2, p), cfg.prefix.head_dim, cfg.rope_theta, embs.dtype)
        torch.testing.assert_close(ours.prefix(embs, AttnContext(cos=cos, sin=sin)), out.last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
        # language embedding: HF Gemma's embed_tokens times sqrt(width), as openpi's embed_prefix does
        torch.testing.assert_close(embs[:, -7:], hf.model.language_model.embed_tokens(tokens) * cfg.prefix.width**0.5)
