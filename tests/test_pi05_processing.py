"""pi05 pre/post-processing: prompt format, state bins, quantile (un)normalization, tokenizers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from evalkit.errors import BadInput
from evalkit.policies.pi05 import processing as proc
from evalkit.policies.pi05.checkpoint import save_checkpoint
from evalkit.policies.pi05.policy import build
from evalkit.policies.pi05.testing import TINY, batch


def test_state_bins_and_prompt_format():
    bins = proc.discretize_state(np.array([-1.0, 0.0, 0.999, 1.5, -3.0]))
    assert bins.tolist() == [0, 128, 255, 255, -1]  # openpi's np.digitize - 1: below -1 renders as -1
    text, suffix = proc.build_prompt("put_the bowl\n", np.array([-1.0, 0.0]))
    assert text == "Task: put the bowl, State: 0 128;\nAction: " and suffix is None
    assert proc.build_prompt(" open the drawer ", None) == ("open the drawer", "\n")


def test_quantile_normalization_roundtrip_and_slicing():
    qs = proc.QuantileStats(q01=np.array([-2.0, 0.0]), q99=np.array([2.0, 10.0]))
    x = np.array([[0.0, 5.0, 7.0]], np.float32)  # third dim has no stats: passes through
    n = qs.normalize(x)
    np.testing.assert_allclose(n[0, :2], [0.0, 0.0], atol=1e-6)
    assert n[0, 2] == 7.0
    np.testing.assert_allclose(qs.unnormalize(n), x, atol=1e-5)
    stats = proc.NormStats(state=None, actions=proc.QuantileStats(np.zeros(7), np.ones(7)), source="t")
    out = proc.actions_to_env(np.full((1, 10, 32), -1.0, np.float32), stats, 7)
    assert out.shape == (1, 10, 7) and out.dtype == np.float32 and np.allclose(out, 0.0, atol=1e-5)


def test_images_to_model_range_and_layout():
    u8 = np.zeros((1, 2, 224, 224, 3), np.uint8)
    u8[0, 1, 5, 7, 2] = 255
    t = proc.images_to_model(torch.from_numpy(u8))
    assert t.shape == (1, 2, 3, 224, 224) and t.min() == -1.0 and t[0, 1, 2, 5, 7] == 1.0
    with pytest.raises(BadInput, match="uint8"):
        proc.stack_views([np.zeros((1, 224, 224, 3), np.float32)])


def test_byte_tokenizer_is_explicit_and_deterministic():
    tok = proc.ByteTokenizer(512)
    assert tok.encode("ab", add_bos=True) == [2, 97 + 3, 98 + 3]
    with pytest.raises(BadInput, match="vocab_size"):
        proc.ByteTokenizer(100)
    tokens, mask = proc.tokenize_batch(tok, ["ab", "abcd"], None, max_len=200, pad_to_max_len=False)
    assert tokens.shape == (2, 6) and mask.sum(1).tolist() == [4, 6]  # BOS + text + "\n"
    tokens, mask = proc.tokenize_batch(tok, ["ab"], None, max_len=3, pad_to_max_len=True)
    assert tokens.shape == (1, 3) and mask.all()


def test_graph_buckets_bound_the_shapes():
    """Under CUDA graphs batches pad to the next power of two with copies of their first row: the keys a rollout of
    16 workers can capture are 1, 2, 4, 8 and 16."""
    from evalkit.policies.pi05.graphs import batch_bucket, pad_batch

    assert [batch_bucket(n) for n in range(1, 18)] == [1, 2, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 32]
    x = {"a": torch.arange(6.0).reshape(3, 2), "b": None}
    padded = pad_batch(x, 4)
    assert padded["b"] is None and padded["a"].tolist() == [[0, 1], [2, 3], [4, 5], [0, 1]]
    assert pad_batch(x, 3)["a"] is x["a"]


def test_cuda_graph_policy_pads_prompts_to_max_len():
    """The graph key does not depend on the prompts: under graphs every prompt pads to max_token_len."""
    policy = build({**TINY}, torch.device("cpu"))
    policy._graphs = object()  # what preprocess reads; no GPU needed to check the host-side shapes
    for seeds, text in (((0,), "ab"), ((1, 2), "a much longer instruction than the first one")):
        tokens = policy.preprocess(batch(*seeds, instruction=text))["tokens"]
        assert tokens.shape == (len(seeds), policy.cfg.max_token_len)


def test_sentencepiece_from_checkpoint_dir(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    text = ["put the black bowl on the plate", "open the top drawer", "pick up the alphabet soup"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=30,
                                   bos_id=2, eos_id=1, unk_id=3, pad_id=0, minloglevel=2)
    src = build({**TINY, "state_in_prompt": False}, torch.device("cpu"))
    ckpt = save_checkpoint(src.model, tmp_path / "ck", norm_stats={
        "state": {"q01": [-1.0] * 8, "q99": [1.0] * 8}, "actions": {"q01": [-1.0] * 7, "q99": [1.0] * 7}})
    (ckpt / "assets" / "paligemma_tokenizer.model").write_bytes(buf.getvalue())
    pol = build({**TINY, "init": "checkpoint", "checkpoint": str(ckpt), "tokenizer": "checkpoint",
                 "state_in_prompt": False}, torch.device("cpu"))
    assert pol.tokenizer.name == "sentencepiece:paligemma_tokenizer.model"
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    host = pol.preprocess(batch(0))
    expect = sp.encode("put the black bowl on the plate", add_bos=True) + sp.encode("\n")
    assert host["tokens"][0].tolist() == expect
    assert pol.predict(batch(0), noise_seed=0).shape == (1, 10, 7)
