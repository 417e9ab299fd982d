"""Pi05Policy: ObsBatch -> actions [B, H, 7], and the registry builder `build(cfg, device)`.

Stages inside one `predict` (each wrapped by the timer passed in): pre (host processing + copy),
encode (vision + embeddings), prefill (prefix KV cache), time_cond (adaRMS modulations of all steps),
denoise (one per Euler step), post. With CUDA graphs: encode, prefill, and one denoise for the whole loop.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evalkit.errors import BadInput, CapabilityError
from evalkit.kernels import decode_attention as decode_kernel
from evalkit.latency.timer import NullTimer
from evalkit.policies.base import ObsBatch, TorchPolicy, check_denoise_steps
from evalkit.policies.pi05 import processing as proc
from evalkit.policies.pi05.checkpoint import (
    PRECISIONS,
    FileMatch,
    allocate,
    check_checkpoint_file,
    checkpoint_precision,
    expected_shapes,
    find_norm_stats,
    load_state_dict_into,
    load_tokenizer,
    meta_model,
    read_checkpoint_config,
    read_norm_stats,
)
from evalkit.policies.pi05.config import (
    Pi05Config,
    full_config,
    replace_fields,
    tiny_config,
)
from evalkit.policies.pi05.model import Pi05Model

log = logging.getLogger(__name__)
VIEW_ORDER = ("agentview", "wrist")  # openpi LIBERO: base_0_rgb = agentview, left_wrist_0_rgb = wrist


def default_state_features(batch: ObsBatch) -> np.ndarray:
    """state_tokens mode: proprio state followed by the privileged arrays in sorted key order."""
    rows = []
    for o in batch.observations:
        parts = [np.asarray(o.state, np.float32).ravel()]
        parts += [np.asarray(o.privileged[k], np.float32).ravel() for k in sorted(o.privileged)]
        rows.append(np.concatenate(parts))
    return np.stack(rows)



def resolve_impl(impl: str, device: torch.device, head_dim: int, queries: int, graphs: bool) -> str:
    """'auto' -> 'triton' when the policy replays CUDA graphs on a GPU where the kernel fits, else 'sdpa'.
    Launched one by one (eager or compile without graphs), Triton's Python launcher costs more than the kernel
    saves (eager bf16 is slower per denoise step with it: docs/backends.md). 'triton' that cannot run raises."""
    if impl not in decode_kernel.IMPLS:
        raise BadInput(f"pi05 decode_attention must be one of {list(decode_kernel.IMPLS)}, got '{impl}'")
    why = "device is not CUDA" if device.type != "cuda" else decode_kernel.triton_fits(head_dim, queries)
    if impl == "auto":
        return "triton" if graphs and not why else "sdpa"
    if impl == "triton" and why:
        raise CapabilityError(f"pi05 decode_attention=triton cannot run: {why}")
    return impl

class Pi05Policy(TorchPolicy):
    name = "pi05"
    needs_privileged = False

    def __init__(
        self,
        model: Pi05Model,
        device: torch.device,
        tokenizer: proc.Tokenizer,
        norm_stats: proc.NormStats,
        denoise_steps: int | None = None,  # None: the default (evalkit.policies.base.DEFAULT_DENOISE_STEPS)
        num_views: int = 2,
        compile: bool = False,
        cuda_graph: bool = False,
        feature_fn: Callable[[ObsBatch], np.ndarray] | None = None,
        seed: int = 0,
        decode_attention: str = "auto",
        decode_attention_pdl: bool = True,
    ) -> None:
        self.model = model
        self.device = device
        self.cfg: Pi05Config = model.cfg
        self.tokenizer = tokenizer
        self.norm_stats = norm_stats
        self.load_report: dict[str, Any] = {}  # set by build: dtype and its source, tokenizer, weights file, tied form
        self.denoise_steps = check_denoise_steps(denoise_steps)
        if num_views not in (1, 2):
            raise BadInput(f"pi05 num_views must be 1 or 2, got {num_views}")
        self.num_views = num_views
        self.cameras = VIEW_ORDER[:num_views]  # envs render only the views the model reads
        self.action_horizon = self.cfg.action_horizon
        self.needs_images = self.cfg.prefix_inputs == "images"
        self.needs_privileged = self.cfg.prefix_inputs == "state_tokens"
        self.feature_fn = feature_fn or default_state_features
        self._rng = torch.Generator().manual_seed(seed)
        self._graphs = None
        self._compiled = False
        self.decode_attention = decode_attention  # the setting; model.decode_impl is what runs
        self._resolve_decode_attention(graphs=False)
        if not isinstance(decode_attention_pdl, bool):
            raise BadInput(f"pi05 decode_attention_pdl must be true or false, got {decode_attention_pdl!r}")
        self.model.decode_pdl = decode_attention_pdl
        if cuda_graph:
            self.enable_cuda_graph()  # raises CapabilityError off-GPU
        if compile:
            self.enable_compile()

    # ------------------------------------------------------------------ options
    def enable_compile(self, mode: str | None = None, expert_mode: str | None = None) -> None:
        """torch.compile each stage's tensor math (embed_prefix, prefix_kv, expert_forward). Compilation is lazy
        (first call), so it sees the modules a backend installed in between. `expert_mode` (e.g.
        "max-autotune-no-cudagraphs") lets the skinny M=H*B expert GEMMs be autotuned apart from the rest."""
        if self._compiled:
            return
        # dynamo caches on the code object, shared by every model in the process: past recompile_limit (8) models
        # it would run a stage eagerly without a word (bench rows did); fail instead of measuring the wrong thing
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        m = self.model
        for name in ("embed_prefix", "prefix_kv", "expert_forward"):
            fn_mode = expert_mode if (name == "expert_forward" and expert_mode) else mode
            setattr(m, name, torch.compile(getattr(m, name), dynamic=False, mode=fn_mode))
        self._compiled = True

    def enable_cuda_graph(self) -> None:
        from evalkit.policies.pi05.graphs import GraphedSampler

        self._resolve_decode_attention(graphs=True)  # before the capture's warm-up runs (they recompile if needed)
        self._graphs = GraphedSampler(self.model, self.device)

    @contextmanager
    def eager(self):
        """Run `predict` eagerly for the duration (module by module, so forward hooks fire: the fidelity checks).
        The weights are the same objects; CUDA-graph replays resume afterwards."""
        graphs, self._graphs = self._graphs, None
        try:
            yield self
        finally:
            self._graphs = graphs

    def _resolve_decode_attention(self, graphs: bool) -> None:
        self.model.decode_impl = resolve_impl(self.decode_attention, self.device, self.cfg.expert.head_dim,
                                              self.cfg.action_horizon, graphs)

    def transformer_stacks(self) -> dict[str, torch.nn.ModuleList]:
        stacks = {"prefix": self.model.prefix.layers, "expert": self.model.expert.layers}
        if hasattr(self.model, "vision"):
            stacks["vision"] = self.model.vision.layers
        return stacks

    # ------------------------------------------------------------------ processing
    def preprocess(self, batch: ObsBatch) -> dict[str, np.ndarray | None]:
        """Host-side inputs (numpy): tokens, token_mask, images, state_features."""
        if len(batch) == 0:
            raise BadInput("pi05 predict got an empty batch")
        state = batch.stacked_state()
        norm_state = self.norm_stats.state.normalize(state) if self.norm_stats.state is not None else state
        # under CUDA graphs prompts are padded to max_token_len (as openpi pads them): one graph key per batch bucket
        tokens, mask = proc.tokenize_batch(
            self.tokenizer, batch.instructions, norm_state if self.cfg.state_in_prompt else None,
            self.cfg.max_token_len, self.cfg.pad_to_max_len or self._graphs is not None,
        )
        out: dict[str, np.ndarray | None] = {"tokens": tokens, "token_mask": None if mask.all() else mask,
                                             "images": None, "state_features": None}
        if self.cfg.prefix_inputs == "images":
            out["images"] = proc.stack_views([batch.stacked_images(v) for v in VIEW_ORDER[: self.num_views]])
        else:
            feats = self.feature_fn(batch)
            if feats.shape[-1] != self.cfg.state_feature_dim:
                raise BadInput(
                    f"pi05 state_tokens: feature vector has {feats.shape[-1]} dims, model expects "
                    f"state_feature_dim={self.cfg.state_feature_dim}"
                )
            out["state_features"] = feats.astype(np.float32)
        return out

    def noise(self, batch: ObsBatch, noise_seed: int | None) -> torch.Tensor:
        """N(0,1) noise [B, H, action_dim] drawn on the CPU (identical on every device).

        `noise_seed` seeds the whole batch; when None, each observation's own `noise_seed` seeds its row
        (batching-invariant rollouts); with neither, the policy's own generator advances.
        """
        shape = (self.cfg.action_horizon, self.cfg.action_dim)
        if noise_seed is not None:
            return torch.randn((len(batch), *shape), generator=torch.Generator().manual_seed(int(noise_seed)))
        seeds = [getattr(o, "noise_seed", None) for o in batch.observations]
        if all(s is not None for s in seeds):
            return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        return torch.randn((len(batch), *shape), generator=self._rng)

    # ------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict(self, batch: ObsBatch, noise_seed: int | None = None, timer=None) -> np.ndarray:
        timer = timer or NullTimer()
        dev = self.device
        with timer.stage("pre"):
            host = self.preprocess(batch)
            inputs = {k: (None if v is None else torch.from_numpy(v).to(dev, non_blocking=True))
                      for k, v in host.items()}
            inputs["noise"] = self.noise(batch, noise_seed).to(dev)
            if inputs["images"] is not None:  # uint8 travels (4x fewer bytes); [-1, 1] floats are made on device
                inputs["images"] = proc.images_to_model(inputs["images"])
        if self._graphs is not None:
            x = self._graphs.run(inputs, self.denoise_steps, timer)
        else:
            m = self.model
            with timer.stage("encode"):
                embs, key_mask = m.embed_prefix(inputs["tokens"], inputs["token_mask"], images=inputs["images"],
                                                state_features=inputs["state_features"])
            with timer.stage("prefill"):
                cache = m.prefill(embs, key_mask)
            x = m.denoise(cache, inputs["noise"], self.denoise_steps, timer=timer)
        with timer.stage("post"):
            if x.is_cuda:  # sleep until the GPU is done instead of spinning a core the env workers need
                done = torch.cuda.Event(blocking=True)
                done.record()
                done.synchronize()
            actions = x.float().cpu().numpy()
            out = proc.actions_to_env(actions, self.norm_stats, self.cfg.env_action_dim)
        return out


# ---------------------------------------------------------------------------------------------- builder
_POLICY_KEYS = {
    "kind", "name", "variant", "init", "checkpoint", "denoise_steps", "compile", "cuda_graph", "num_views",
    "tokenizer", "norm_stats", "seed", "dtype", "model", "prefix_inputs", "state_feature_dim", "state_prefix_tokens",
    "state_in_prompt", "action_horizon", "decode_attention", "decode_attention_pdl",
}


def _model_config(cfg: dict[str, Any], meta: dict[str, Any] | None) -> Pi05Config:
    """Sizes from the variant (+ overrides); variant=checkpoint: config.json's saved sizes (`meta`, already read)."""
    try:
        return _sizes(cfg, meta)
    except TypeError as e:  # a size block with unknown or missing fields (GemmaSize(**...))
        where = f"{cfg.get('checkpoint')}/config.json 'evalkit_pi05'" if cfg.get("variant") == "checkpoint" else \
            "policy.model"
        raise BadInput(f"pi05 model sizes from {where} are malformed ({e})") from None


def _sizes(cfg: dict[str, Any], meta: dict[str, Any] | None) -> Pi05Config:
    overrides = dict(cfg.get("model") or {})
    for k in ("prefix_inputs", "state_feature_dim", "state_prefix_tokens", "state_in_prompt", "action_horizon",
              "num_views"):
        if cfg.get(k) is not None:
            overrides[k] = cfg[k]
    variant = cfg.get("variant", "full")
    if variant == "tiny":
        return tiny_config(**overrides)
    if variant == "full":
        return full_config(**overrides)
    if variant == "checkpoint":  # exact sizes saved by save_checkpoint (config.json's "evalkit_pi05")
        if meta is None:
            raise BadInput("pi05 variant=checkpoint needs init=checkpoint and policy.checkpoint=<directory>")
        if "evalkit_pi05" not in meta:
            raise BadInput(f"{cfg['checkpoint']}/config.json has no 'evalkit_pi05' sizes (written by save_checkpoint); "
                           "use variant=full for openpi/LeRobot checkpoints")
        saved = dict(meta["evalkit_pi05"])
        conflicts = {k: (saved.get(k), v) for k, v in overrides.items() if saved.get(k) != v}
        if conflicts:
            raise BadInput(f"pi05 config disagrees with the checkpoint's saved sizes (saved, asked): {conflicts}")
        return replace_fields(full_config(), saved)
    raise BadInput(f"pi05 variant must be 'tiny', 'full' or 'checkpoint', got '{variant}'")


@dataclass
class LoadPlan:
    """What `build` needs from the config and the checkpoint's files, all read and checked before a model exists."""

    mcfg: Pi05Config
    init: str
    dtype: torch.dtype
    dtype_source: str
    tokenizer: proc.Tokenizer
    norm_stats: proc.NormStats
    ckpt: Path | None = None
    weights: FileMatch | None = None


def _dtype(cfg: dict[str, Any], meta: dict[str, Any] | None, ckpt: Path | None) -> tuple[torch.dtype, str]:
    """policy.dtype when set; else the checkpoint's config.json precision; else float32 (random init)."""
    asked = cfg.get("dtype")
    if asked is not None:
        if not isinstance(asked, str) or asked not in PRECISIONS:
            raise BadInput(f"pi05 dtype must be one of {sorted(PRECISIONS)} or null (the checkpoint's precision), "
                           f"got {asked!r}")
        return PRECISIONS[asked], "policy.dtype"
    precision = checkpoint_precision(meta) if meta is not None else None
    if precision is not None:
        return precision, f"{ckpt}/config.json precision"
    if meta is not None:
        return torch.float32, f"float32: {ckpt}/config.json names no precision"
    return torch.float32, "float32: random init"


def plan_build(cfg: dict[str, Any]) -> LoadPlan:
    """Every check that needs no model: fields, checkpoint files, config.json, tokenizer, norm stats, and the
    weights file's keys, shapes and dtypes against the model's (from a meta-device model). Seconds at true size."""
    unknown = sorted(set(cfg) - _POLICY_KEYS)
    if unknown:
        raise BadInput(f"unknown pi05 policy fields {unknown}; valid: {sorted(_POLICY_KEYS)}")
    init = cfg.get("init", "random")
    if init not in ("random", "checkpoint"):
        raise BadInput(f"pi05 init must be 'random' or 'checkpoint', got '{init}'")
    ckpt, meta = None, None
    if init == "checkpoint":
        if not cfg.get("checkpoint"):
            raise BadInput("pi05 init=checkpoint needs policy.checkpoint=<directory> (an openpi/LeRobot π0.5 PyTorch "
                           "checkpoint: model.safetensors, config.json, assets/*/norm_stats.json); "
                           "policy.init=random for latency work")
        ckpt = Path(str(cfg["checkpoint"])).expanduser()
        if not ckpt.is_dir():
            what = "is a file" if ckpt.exists() else "does not exist"
            raise BadInput(f"{ckpt}: {what}; policy.checkpoint names the directory holding model.safetensors")
        weights = ckpt / "model.safetensors"
        if not weights.is_file():
            raise BadInput(f"{weights}: not found (pi05 loads safetensors only; directory holds: "
                           f"{sorted(p.name for p in ckpt.iterdir())})")
        meta = read_checkpoint_config(ckpt)
    elif cfg.get("variant") == "checkpoint":
        raise BadInput("pi05 variant=checkpoint needs init=checkpoint and policy.checkpoint=<directory>")
    mcfg = _model_config(cfg, meta)
    if meta is not None:
        for k in ("action_dim", "action_horizon"):
            if k in meta and int(meta[k]) != getattr(mcfg, k):
                raise BadInput(f"{ckpt}/config.json: {k}={meta[k]} but the pi05 config has {getattr(mcfg, k)}")
    dtype, dtype_source = _dtype(cfg, meta, ckpt)
    tokenizer = load_tokenizer(cfg.get("tokenizer"), ckpt, mcfg.vocab_size)
    norm_stats = proc.NormStats.identity()
    ns_path = Path(str(cfg["norm_stats"])).expanduser() if cfg.get("norm_stats") else (
        find_norm_stats(ckpt) if ckpt is not None else None)
    if ns_path is not None:
        state_dims = (mcfg.state_dim, max(mcfg.state_dim, mcfg.action_dim)) if mcfg.state_in_prompt else None
        norm_stats = read_norm_stats(ns_path, action_dims=(mcfg.env_action_dim, mcfg.action_dim),
                                     state_dims=state_dims)
    match = check_checkpoint_file(ckpt, expected_shapes(mcfg)) if ckpt is not None else None
    return LoadPlan(mcfg=mcfg, init=init, dtype=dtype, dtype_source=dtype_source, tokenizer=tokenizer,
                    norm_stats=norm_stats, ckpt=ckpt, weights=match)


def precheck(cfg: dict[str, Any]) -> None:
    """The registry's precheck for pi05: everything `build` checks before it builds the model (raises BadInput)."""
    plan_build(cfg)


def build(cfg: dict[str, Any], device: torch.device) -> Pi05Policy:
    """cfg: the resolved `policy` group (conf/policy/pi05*.yaml) plus denoise_steps."""
    device = torch.device(device)
    if cfg.get("cuda_graph") and device.type != "cuda":
        raise CapabilityError(f"pi05 cuda_graph=true needs a CUDA GPU; device is {device}")
    if cfg.get("compile") and device.type != "cuda":
        raise CapabilityError(f"pi05 compile=true is supported on CUDA only (GPU-side option); device is {device}")
    plan = plan_build(cfg)
    report: dict[str, Any] = {"dtype": str(plan.dtype).replace("torch.", ""), "dtype_source": plan.dtype_source,
                              "tokenizer": plan.tokenizer.name, "norm_stats": plan.norm_stats.source}
    if plan.init == "random":
        with torch.device(device):
            model = Pi05Model(plan.mcfg).to(plan.dtype)
        model.init_random(seed=int(cfg.get("seed") or 0))
    else:
        # Every parameter comes from the file (strictly matched), so skip the initializers: built on the meta device
        # and allocated in the target dtype, a true-size model costs its final bytes only, not float32 + a copy.
        model = allocate(meta_model(plan.mcfg).to(plan.dtype), device)
        report.update(load_state_dict_into(model, plan.ckpt))
    model.eval()
    log.info("pi05 weights: %s", report)
    policy = Pi05Policy(
        model, device, plan.tokenizer, plan.norm_stats,
        denoise_steps=cfg.get("denoise_steps"),
        num_views=int(cfg.get("num_views") or plan.mcfg.num_views),
        compile=bool(cfg.get("compile")), cuda_graph=bool(cfg.get("cuda_graph")),
        seed=int(cfg.get("seed") or 0), decode_attention=cfg.get("decode_attention") or "auto",
        decode_attention_pdl=cfg.get("decode_attention_pdl", True),
    )
    policy.load_report = report
    return policy
