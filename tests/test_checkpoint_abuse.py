"""Corrupt and missing checkpoint files, as a hostile or unlucky user hands them over.

Each case spoils one file of a tiny pi05 checkpoint; `precheck_policy` (what a run calls before building anything)
must raise BadInput, which the CLI prints as one line and exit 2, with a message naming the file and, where there
is one, the key. The cases caught only while loading tensors (NaN weights, a tied pair that differs) go through
`build`; every other case runs with the model's construction forbidden, so it must be refused before any weights
exist.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evalkit.errors import BadInput
from evalkit.policies.pi05 import policy as pi05_policy
from evalkit.policies.pi05.checkpoint import EMBEDDING, TIED_EMBEDDING, save_checkpoint
from evalkit.policies.pi05.testing import TINY, tiny_policy
from evalkit.policies.registry import build_policy, precheck_policy
from tests.conftest import REPO, run_cli

STATS = {"state": {"q01": [-0.5] * 8, "q99": [0.5] * 8}, "actions": {"q01": [-2.0] * 7, "q99": [3.0] * 7}}
NS = "assets/libero/norm_stats.json"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "ckpt"
    save_checkpoint(tiny_policy(seed=1).model, out, norm_stats=STATS)
    return out


@pytest.fixture()
def ckpt(good, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(good, tmp_path / "ckpt"))


@pytest.fixture()
def no_model_build(monkeypatch):
    """Any attempt to build the model's weights fails the test (header checks use a meta-device model elsewhere)."""
    def refuse(*a, **k):
        raise AssertionError("a pi05 model was built before the bad input was reported")

    monkeypatch.setattr(pi05_policy, "Pi05Model", refuse)  # random init
    monkeypatch.setattr(pi05_policy, "meta_model", refuse)  # init=checkpoint: allocated from a meta-device model


def cfg_for(ckpt: Path, **over) -> dict:
    return {**TINY, "init": "checkpoint", "checkpoint": str(ckpt), **over}


def sp_model(tmp_path: Path) -> Path:
    """A small real SentencePiece model (trained in milliseconds), about 30 pieces."""
    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["put the black bowl on the plate", "open the top drawer and put the bowl inside"] * 20),
        model_writer=buf, vocab_size=30, model_type="unigram", minloglevel=2, hard_vocab_limit=False)
    path = tmp_path / "tok.model"
    path.write_bytes(buf.getvalue())
    return path


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    # copies: the loaded tensors may map the file, which is about to be overwritten
    return {k: v.clone() for k, v in load_file(str(ckpt / "model.safetensors")).items()}


def rewrite_weights(ckpt: Path, fn) -> None:
    sd = read_weights(ckpt)
    fn(sd)
    save_file(sd, str(ckpt / "model.safetensors"))


def edit_json(rel: str, fn):
    def mutate(ckpt: Path, tmp_path: Path) -> dict:
        path = ckpt / rel
        path.write_text(json.dumps(fn(json.loads(path.read_text()))))
        return {}
    return mutate


def write(rel: str, data: bytes | str):
    def mutate(ckpt: Path, tmp_path: Path) -> dict:
        path = ckpt / rel
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return {}
    return mutate


def truncate(fraction: float):
    def mutate(ckpt: Path, tmp_path: Path) -> dict:
        path = ckpt / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
        return {}
    return mutate


def remove(rel: str):
    def mutate(ckpt: Path, tmp_path: Path) -> dict:
        (ckpt / rel).unlink()
        return {}
    return mutate


def pickle_weights(ckpt: Path, tmp_path: Path) -> dict:
    torch.save(read_weights(ckpt), ckpt / "model.safetensors")
    return {}


def stats_with(entry: str, **fields):
    return edit_json(NS, lambda d: {"norm_stats": {**d["norm_stats"], entry: {**d["norm_stats"][entry], **fields}}})


def weights(fn):
    def mutate(ckpt: Path, tmp_path: Path) -> dict:
        rewrite_weights(ckpt, fn)
        return {}
    return mutate


def set_item(key: str, value_fn):
    return weights(lambda sd: sd.__setitem__(key, value_fn(sd)))


LAYER_UP = "paligemma_with_expert.paligemma.model.language_model.layers.1.mlp.up_proj.weight"

# id, mutation (returns policy overrides), file named in the message (relative to the checkpoint; None: the
# checkpoint directory), text the message must hold
CASES = [
    ("safetensors_truncated_half", truncate(0.5), "model.safetensors", "not a readable safetensors file"),
    ("safetensors_truncated_in_header", lambda c, t: write("model.safetensors", b"\x10\x00")(c, t),
     "model.safetensors", "not a readable safetensors file"),
    ("safetensors_empty", write("model.safetensors", b""), "model.safetensors", "not a readable safetensors file"),
    ("pickle_named_safetensors", pickle_weights, "model.safetensors", "never pickle"),
    ("random_bytes_safetensors", write("model.safetensors", os.urandom(4096)), "model.safetensors",
     "not a readable safetensors file"),
    ("safetensors_missing", remove("model.safetensors"), "model.safetensors", "not found"),
    ("weights_integer_dtype", set_item(LAYER_UP, lambda sd: sd[LAYER_UP].to(torch.int64)), "model.safetensors",
     f"non-floating-point dtype [{LAYER_UP} I64]"),
    ("weights_key_missing", weights(lambda sd: sd.pop(LAYER_UP)), "model.safetensors", f"missing keys [{LAYER_UP}]"),
    ("weights_extra_key", set_item("bogus.weight", lambda sd: torch.zeros(2)), "model.safetensors",
     "unexpected keys [bogus.weight]"),
    ("config_missing", remove("config.json"), "config.json", "not found"),
    ("config_is_a_list", write("config.json", "[1, 2, 3]"), "config.json", "expected a JSON object"),
    ("config_not_json", write("config.json", "action_dim: 32\n"), "config.json", "not valid JSON"),
    ("config_truncated_json", write("config.json", '{"action_dim": 32, "action_hor'), "config.json", "not valid JSON"),
    ("config_invalid_utf8", write("config.json", b'{"action_dim": "\xff\xfe"}'), "config.json", "not UTF-8"),
    ("config_horizon_a_string", edit_json("config.json", lambda d: {**d, "action_horizon": "ten"}), "config.json",
     "key 'action_horizon' must be a positive integer"),
    ("config_precision_unknown", edit_json("config.json", lambda d: {**d, "precision": "fp8"}), "config.json",
     "key 'precision' must be one of"),
    ("config_horizon_disagrees", edit_json("config.json", lambda d: {**d, "action_horizon": 50}), "config.json",
     "action_horizon=50 but the pi05 config has 10"),
    ("norm_stats_missing", remove(NS), None, "expected exactly one norm_stats.json"),
    ("norm_stats_not_json", write(NS, "{'state': }"), NS, "not valid JSON"),
    ("norm_stats_a_list", write(NS, "[]"), NS, "expected a JSON object"),
    ("norm_stats_no_actions", edit_json(NS, lambda d: {"norm_stats": {"state": d["norm_stats"]["state"]}}), NS,
     "no 'norm_stats.actions' entry"),
    ("norm_stats_actions_a_list", edit_json(NS, lambda d: {"norm_stats": {**d["norm_stats"], "actions": [1, 2]}}), NS,
     "norm_stats.actions must be an object with q01 and q99"),
    ("norm_stats_no_q99", edit_json(NS, lambda d: {"norm_stats": {**d["norm_stats"], "actions": {"q01": [0] * 7}}}),
     NS, "norm_stats.actions has no q99"),
    ("norm_stats_nan", write(NS, json.dumps({"norm_stats": {**STATS, "actions": {"q01": [-2.0] * 7,
                                                                               "q99": [3.0] * 6 + [float("nan")]}}})),
     NS, "norm_stats.actions.q99 holds NaN or infinite values at dims [6]"),
    ("norm_stats_null_value", stats_with("state", q01=[-0.5] * 7 + [None]), NS, "norm_stats.state.q01[7] is null"),
    ("norm_stats_string_value", stats_with("actions", q01=["a"] * 7), NS, "norm_stats.actions.q01[0] is a JSON string"),
    ("norm_stats_nested_lists", stats_with("actions", q01=[[0.0] * 7]), NS, "norm_stats.actions.q01[0] is a JSON list"),
    ("norm_stats_lengths_differ", stats_with("actions", q01=[-2.0] * 6), NS, "q01 has 6 dims but q99 has 7"),
    ("norm_stats_wrong_dims", stats_with("actions", q01=[-2.0] * 3, q99=[3.0] * 3), NS,
     "norm_stats.actions has 3 dims; the model needs 7 to 32"),
    ("norm_stats_state_wrong_dims", stats_with("state", q01=[-0.5] * 2, q99=[0.5] * 2), NS,
     "norm_stats.state has 2 dims; the model needs 8 to 32"),
    ("norm_stats_q99_below_q01", stats_with("actions", q99=[-3.0] * 7), NS, "norm_stats.actions.q99 < q01 at dims"),
    ("norm_stats_two_files", lambda c, t: (c / "assets" / "other").mkdir() or write(
        "assets/other/norm_stats.json", json.dumps({"norm_stats": STATS}))(c, t), None,
     "expected exactly one norm_stats.json"),
    ("norm_stats_override_missing", lambda c, t: {"norm_stats": str(t / "nope.json")}, "../nope.json", "not found"),
    ("tokenizer_random_bytes", lambda c, t: (t / "rand.model").write_bytes(os.urandom(3000)) and
     {"tokenizer": str(t / "rand.model")}, "../rand.model", "not a SentencePiece model"),
    ("tokenizer_empty_file", lambda c, t: (t / "empty.model").write_bytes(b"") or
     {"tokenizer": str(t / "empty.model")}, "../empty.model", "not a SentencePiece model"),
    ("tokenizer_missing", lambda c, t: {"tokenizer": str(t / "absent.model")}, "../absent.model", "not found"),
    ("tokenizer_not_in_checkpoint", lambda c, t: {"tokenizer": "checkpoint"}, None,
     "no SentencePiece tokenizer in the checkpoint"),
    ("tokenizer_vocab_too_large", lambda c, t: {"tokenizer": str(sp_model(t)), "model": {"vocab_size": 20}},
     "../tok.model", "pieces but the model embeds 20"),
    ("checkpoint_dir_missing", lambda c, t: {"checkpoint": str(t / "nowhere")}, "../nowhere", "does not exist"),
    ("checkpoint_is_a_file", lambda c, t: {"checkpoint": str(c / "config.json")}, "config.json", "is a file"),
]


@pytest.mark.parametrize("mutate,file,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_corrupt_file_is_one_line_bad_input_naming_it(ckpt, tmp_path, no_model_build, mutate, file, text):
    over = mutate(ckpt, tmp_path) or {}
    for call in (precheck_policy, lambda c: build_policy(c, torch.device("cpu"))):
        with pytest.raises(BadInput) as e:
            call(cfg_for(ckpt, **over))
        msg = str(e.value)
        assert "\n" not in msg and text in msg, msg
        named = ckpt if file is None else (ckpt / file).resolve() if file.startswith("..") else ckpt / file
        assert str(named) in msg, msg


# Caught only when the tensors are read: `build`, still refused before any weight is used.
LOAD_CASES = [
    ("weights_nan", set_item(LAYER_UP, lambda sd: torch.full_like(sd[LAYER_UP], float("nan"))),
     f"NaN or infinite values in [{LAYER_UP}]"),
    ("weights_inf", set_item(LAYER_UP, lambda sd: torch.full_like(sd[LAYER_UP], float("inf"))),
     f"NaN or infinite values in [{LAYER_UP}]"),
    ("tied_pair_differs", weights(lambda sd: sd.__setitem__(EMBEDDING, torch.zeros_like(sd[TIED_EMBEDDING]))),
     f"{TIED_EMBEDDING} is the tied twin of {EMBEDDING}"),
]


@pytest.mark.parametrize("mutate,text", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_bad_tensor_values_are_one_line_bad_input_at_load(ckpt, tmp_path, mutate, text):
    mutate(ckpt, tmp_path)
    precheck_policy(cfg_for(ckpt))  # header, names, shapes and dtypes are fine
    with pytest.raises(BadInput) as e:
        build_policy(cfg_for(ckpt), torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and text in msg and str(ckpt / "model.safetensors") in msg, msg


def test_pi05_without_checkpoint_says_so_before_building(no_model_build):
    """The shipped conf/policy/pi05.yaml (init: checkpoint, checkpoint: null): true size, but nothing is built."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "policy" / "pi05.yaml"), resolve=True)
    for call in (precheck_policy, lambda c: build_policy(c, torch.device("cpu"))):
        with pytest.raises(BadInput, match=r"pi05 init=checkpoint needs policy\.checkpoint=<directory>"):
            call(cfg)


def test_pi05_openpi_checkpoint_without_tokenizer_names_the_setting(ckpt, no_model_build):
    """openpi ships no tokenizer: the default `tokenizer: checkpoint` says which setting to give, before any model."""
    with pytest.raises(BadInput) as e:
        precheck_policy({"kind": "pi05", "variant": "tiny", "init": "checkpoint", "checkpoint": str(ckpt),
                         "tokenizer": "checkpoint"})
    msg = str(e.value)
    assert "\n" not in msg and "set policy.tokenizer=/path/to/paligemma_tokenizer.model" in msg and str(ckpt) in msg


def test_a_valid_sentencepiece_tokenizer_passes(ckpt, tmp_path):
    precheck_policy(cfg_for(ckpt, tokenizer=str(sp_model(tmp_path))))


def test_good_checkpoint_passes_precheck(ckpt):
    precheck_policy(cfg_for(ckpt))


REFERENCE_CASES = [
    ("features_missing", lambda d: {"norm_stats": {k: v for k, v in d["norm_stats"].items() if k != "features"}},
     "no 'norm_stats.features' statistics"),
    ("features_wrong_dims", lambda d: {"norm_stats": {**d["norm_stats"], "features": {"mean": [0.0] * 5,
                                                                                     "std": [1.0] * 5}}},
     "norm_stats.features need 70 dims"),
    ("features_zero_std", lambda d: {"norm_stats": {**d["norm_stats"], "features": {
        **d["norm_stats"]["features"], "std": [0.0] + d["norm_stats"]["features"]["std"][1:]}}},
     "norm_stats.features.std must be > 0"),
    ("features_nan", lambda d: {"norm_stats": {**d["norm_stats"], "features": {
        **d["norm_stats"]["features"], "mean": [float("nan")] * 29}}}, "norm_stats.features.mean holds NaN"),
]


@pytest.mark.parametrize("edit,text", [c[1:] for c in REFERENCE_CASES], ids=[c[0] for c in REFERENCE_CASES])
def test_reference_policy_files_checked(tmp_path, edit, text, no_model_build):
    import shutil

    from evalkit.policies.reference import DEFAULT_DIR

    precheck_policy({"kind": "reference"})  # the shipped files pass
    ref = Path(shutil.copytree(DEFAULT_DIR, tmp_path / "ref"))
    ns = next(ref.rglob("norm_stats.json"))
    ns.write_text(json.dumps(edit(json.loads(ns.read_text()))))
    with pytest.raises(BadInput) as e:
        precheck_policy({"kind": "reference", "checkpoint": str(ref)})
    msg = str(e.value)
    assert "\n" not in msg and text in msg and str(ns) in msg, msg


@pytest.mark.parametrize("cfg,text", [
    ({"kind": "nope"}, "unknown policy kind 'nope'; valid: noop, pi05, random, reference, reference_vision, remote, scripted"),
    ({"kind": "noop", "action_horizon": 0}, "policy noop: action_horizon must be an integer >= 1, got 0"),
    ({"kind": "noop", "acton_horizon": 5}, "unknown noop policy fields ['acton_horizon']"),
    ({"kind": "random", "scale": "big"}, "policy random: bad setting"),
    ({"kind": "remote", "port": 70000}, "policy remote: port must be an integer in [1, 65535], got 70000"),
    ({"kind": "remote", "prot": 8001}, "unknown remote policy fields ['prot']"),
    ({"kind": "remote", "connect_timeout_s": -1}, "policy remote: connect_timeout_s must be a number >= 0"),
    ({"kind": "reference", "checkpoint": "/nonexistent/ref"}, "reference policy checkpoint not found"),
    ({"kind": "scripted", "kpp": 1}, "['kpp']"),  # scripted's builder lists its own fields
])
def test_other_policies_prechecked(cfg, text):
    with pytest.raises(BadInput) as e:
        precheck_policy(cfg)
    assert text in str(e.value) and "\n" not in str(e.value)


def test_valid_light_policies_pass_precheck():
    for kind in ("noop", "random", "scripted"):
        precheck_policy({"kind": kind})
    precheck_policy({"kind": "remote", "host": "127.0.0.1", "port": 8000})  # no connection attempted


def test_cli_prints_one_line_and_exits_2(ckpt, tmp_path):
    """The whole path a user takes: a pickle named model.safetensors."""
    pickle_weights(ckpt, tmp_path)
    p = run_cli("policy=pi05_tiny", "policy.init=checkpoint", f"policy.checkpoint={ckpt}", "tracking=offline",
                "quiet=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and f"{ckpt / 'model.safetensors'}: not a readable safetensors file" in errors[0], p.stderr
