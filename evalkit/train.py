"""Flow-matching behaviour cloning of a small π0.5 (state_tokens prefix) on scripted demonstrations.

    python -m evalkit.train                                  # conf/train/reference.yaml
    python -m evalkit.train config=conf/train/reference.yaml steps=200 out=/tmp/ref device=cpu

Two stages, so the GPU machine needs neither LIBERO nor the raw episodes:
  1. `pack`: the episode npz files (evalkit/demos.py) -> one packed npz (features, per-step actions,
     chunk indices, instruction tokens) + normalization statistics. Cached at `packed`.
  2. `fit`: the same π0.5 code as `policy=pi05` (evalkit/policies/pi05, small widths/depths), trained
     with `Pi05Model.flow_matching_loss`; written with `save_checkpoint` (safetensors + config.json +
     assets/<id>/norm_stats.json) plus `train_config.yaml` and `train_log.json`.
Reproducible from the config: one seed drives the weights, the batch order, noise and flow times.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from evalkit.cli_args import opt, parse
from evalkit.config import CONF_DIR
from evalkit.errors import BadInput

DEFAULT_CONFIG = CONF_DIR / "train" / "reference.yaml"
FIT_PROBE_STEPS = 200  # steps timed before a max_seconds run fits its schedule to the time left
# steps left out of that timing: the first steps pay one-time costs (allocator, kernel selection, the first
# validation) that made a 720 s run plan 4,892 steps and finish in 404 s (2026-12-07, H100)
FIT_WARMUP_STEPS = 50


# ----------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """The keys of a train config (conf/train/*.yaml, which documents them and holds the values). Required keys
    have no default here; null leaves a key to the trainer's own default."""

    data: list[str] = opt(help="episode folders written by `python -m evalkit.demos`")
    inputs: Optional[str] = opt(None, "state_tokens (planner features; policy=reference) | images (two camera views + "
                                      "the state in the prompt; policy=reference_vision)")
    augment_shift: Optional[int] = opt(None, "images: random shift of each view by up to this many pixels (0: none)")
    amp: Optional[bool] = opt(None, "forward passes under bf16 autocast (weights and optimizer stay float32)")
    compile: Optional[bool] = opt(None, "torch.compile the training loss (one static-shape graph; a small model's "
                                        "eager step is launch-bound). If compiling fails, training goes on eager and "
                                        "the log says so")
    packed: str = opt(help="packed training arrays + norm stats (built from `data` when missing)")
    repack: Optional[bool] = opt(None, "rebuild `packed` even if it exists")
    pack_only: Optional[bool] = opt(None, "only build `packed`, no training")
    out: str = opt(help="checkpoint folder")
    seed: int = opt(help="one seed for weights, batch order, noise and flow times")
    device: Optional[str] = opt(None, "auto | cpu | cuda")
    horizon: int = opt(help="action chunk length H")
    model: dict = opt(help="overrides of pi05 tiny_config, e.g. model.prefix.width=128")
    steps: int = opt(help="optimizer steps (the lr schedule spans them)")
    batch_size: int = opt(help="samples per step")
    lr: float = opt(help="peak learning rate")
    warmup: Optional[int] = opt(None, "linear warmup steps")
    weight_decay: Optional[float] = opt(None, "AdamW weight decay")
    val_fraction: Optional[float] = opt(None, "fraction of episodes held out for validation loss")
    log_every: Optional[int] = opt(None, "steps between validation logs")
    max_seconds: Optional[float] = opt(None, ">0: stop after this many seconds (steps_done recorded)")
    stop_after: Optional[int] = opt(None, ">0: stop after this many steps, schedule still laid out for `steps`")
    action_min_half_range: Optional[float] = opt(None, "floor on each action dim's quantile half-range")
    action_clip: Optional[float] = opt(None, "clip normalized action targets to +-this (0: none)")
    steps_done: Optional[int] = opt(None, "written by a run into its train_config.yaml; ignored as input")
    ema_decay: Optional[float] = opt(None, ">0: validate and save an exponential moving average of the weights "
                                           "(torch.optim.swa_utils; e.g. 0.999), the usual choice for BC policies")
    init_from: Optional[str] = opt(None, "a checkpoint folder to resume from: its weights and normalization statistics "
                                         "(training continues across sessions; the lr schedule starts anew)")


def load_config(argv: list[str]) -> dict[str, Any]:
    """A train config file (config=PATH, default conf/train/reference.yaml) + `key=value` / `a.b=value` overrides."""
    cfg = parse(TrainConfig, argv, prog="python -m evalkit.train", config=DEFAULT_CONFIG,
                about="flow-matching behaviour cloning of a small pi0.5 on scripted demonstrations")
    return {k: v for k, v in asdict(cfg).items() if v is not None}


# ----------------------------------------------------------------------------------------------- packing
def chunk_indices(lengths: list[int], horizon: int) -> np.ndarray:
    """For every step t of every episode: the indices of steps t..t+H-1, repeating the episode's last step."""
    rows, start = [], 0
    for n in lengths:
        t = np.arange(n)[:, None] + np.arange(horizon)[None]
        rows.append(start + np.minimum(t, n - 1))
        start += n
    return np.concatenate(rows).astype(np.int64)


def quantile_stats(x: np.ndarray, min_half_range: float = 0.0) -> dict[str, list[float]]:
    q01, q99 = np.quantile(x, 0.01, axis=0), np.quantile(x, 0.99, axis=0)
    c = (q01 + q99) / 2
    q01 = np.minimum(q01, c - min_half_range)
    q99 = np.maximum(q99, c + min_half_range)
    return {"q01": q01.tolist(), "q99": q99.tolist(), "mean": x.mean(0).tolist(), "std": x.std(0).tolist()}


def pack(cfg: dict[str, Any]) -> Path:
    """Episode files -> packed arrays + norm stats at cfg['packed'] (rebuilt when `repack` is true or missing)."""
    out = Path(cfg["packed"])
    if out.is_file() and not cfg.get("repack", False):
        return out
    from evalkit.policies.reference import episode_features

    files = sorted(f for d in cfg["data"] for f in Path(d).glob("*.npz"))
    if not files:
        raise BadInput(f"no episode files (*.npz) under {cfg['data']}; run `python -m evalkit.demos` first")
    images = inputs_of(cfg) == "images"
    feats, acts, states, lengths, instr_ids, episode_ids, views = [], [], [], [], [], [], []
    instructions: list[str] = []
    for i, f in enumerate(files):
        with np.load(f) as d:
            text = str(d["instruction"])
            if text not in instructions:
                instructions.append(text)
            n = len(d["actions"])
            if images:
                missing = [c for c in CAMERA_KEYS if c not in d.files]
                if missing:
                    raise BadInput(f"{f}: no {missing} frames; record image demos with "
                                   "`python -m evalkit.demos images=true`")
                views.append(np.stack([d[c] for c in CAMERA_KEYS], axis=1))
            else:
                feats.append(episode_features(d))  # recomputed from p:* and stage:* (the recorded copy may be older)
            acts.append(d["actions"])
            states.append(d["state"])
            lengths.append(n)
            instr_ids.append(np.full(n, instructions.index(text), np.int64))
            episode_ids.append(np.full(n, i, np.int64))
    acts_a, states_a = np.concatenate(acts), np.concatenate(states)
    stats = {
        "actions": quantile_stats(acts_a, min_half_range=cfg.get("action_min_half_range", 0.1)),
        "state": quantile_stats(states_a, min_half_range=1e-3),
    }
    arrays = {"actions": acts_a, "states": states_a}
    if images:
        arrays["images"] = np.concatenate(views)  # uint8 [N, V, S, S, 3]
    else:
        feats_a = np.concatenate(feats)
        stats["features"] = {"mean": feats_a.mean(0).tolist(), "std": np.maximum(feats_a.std(0), 1e-3).tolist()}
        arrays["features"] = feats_a
    out.parent.mkdir(parents=True, exist_ok=True)
    (np.savez if images else np.savez_compressed)(  # frames barely compress
        out, **arrays, chunks=chunk_indices(lengths, cfg["horizon"]),
        instr_ids=np.concatenate(instr_ids), episode_ids=np.concatenate(episode_ids),
        instructions=np.array(instructions), lengths=np.array(lengths), stats=np.array(json.dumps(stats)),
        files=np.array([str(f) for f in files]),
    )
    print(f"packed {len(files)} episodes, {len(acts_a)} steps, {len(instructions)} instructions -> {out}", flush=True)
    return out


# ----------------------------------------------------------------------------------------------- model
CAMERA_KEYS = ("agentview", "wrist")  # the order of pi05's VIEW_ORDER


def inputs_of(cfg: dict[str, Any]) -> str:
    inputs = cfg.get("inputs") or "state_tokens"
    if inputs not in ("state_tokens", "images"):
        raise BadInput(f"train inputs must be state_tokens or images, got {inputs!r}")
    return inputs


def model_config(cfg: dict[str, Any], feature_dim: int):
    from evalkit.policies.pi05.config import tiny_config

    m = dict(cfg["model"])
    if inputs_of(cfg) == "images":  # openpi's π0.5: views + the quantile-binned state in the prompt
        return tiny_config(prefix_inputs="images", state_in_prompt=True, num_views=len(CAMERA_KEYS),
                           action_horizon=cfg["horizon"], **m)
    return tiny_config(prefix_inputs="state_tokens", state_feature_dim=feature_dim, action_horizon=cfg["horizon"],
                       **m)


def shift_views(images: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation of each view by up to `max_shift` pixels (edges replicated): float [B, V, 3, S, S]."""
    if max_shift <= 0:
        return images
    b, v, c, h, w = images.shape
    flat = images.reshape(b * v, c, h, w)
    shift = (torch.rand(b * v, 2, generator=gen, device=images.device) * 2 - 1) * (2 * max_shift / w)
    theta = torch.zeros(b * v, 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = torch.nn.functional.affine_grid(theta, list(flat.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(flat, grid, padding_mode="border", align_corners=False)
    return out.reshape(b, v, c, h, w)


def normalize_features(x: np.ndarray, stats: dict) -> np.ndarray:
    mean, std = np.asarray(stats["features"]["mean"], np.float32), np.asarray(stats["features"]["std"], np.float32)
    return np.clip((x - mean) / std, -5.0, 5.0).astype(np.float32)


def normalize_actions(a: np.ndarray, stats: dict, clip: float) -> np.ndarray:
    """openpi's quantile normalization; targets clipped to ±clip (0: no clip)."""
    q01, q99 = np.asarray(stats["actions"]["q01"], np.float32), np.asarray(stats["actions"]["q99"], np.float32)
    x = (a - q01) / (q99 - q01 + 1e-6) * 2 - 1
    return (np.clip(x, -clip, clip) if clip else x).astype(np.float32)


def tokenize(instructions: list[str], vocab_size: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    from evalkit.policies.pi05 import processing as proc

    return proc.tokenize_batch(proc.ByteTokenizer(vocab_size), list(instructions), None, max_len, False)


# ----------------------------------------------------------------------------------------------- training
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"train device={name} but CUDA is not available")
    return torch.device(name)


def fit(cfg: dict[str, Any]) -> dict[str, Any]:
    from evalkit.policies.pi05.checkpoint import save_checkpoint
    from evalkit.policies.pi05.model import Pi05Model

    packed = np.load(pack(cfg))
    stats = json.loads(str(packed["stats"]))
    resume = Path(str(cfg["init_from"])).expanduser() if cfg.get("init_from") else None
    if resume is not None:  # the checkpoint's statistics, so its weights see inputs scaled as they were trained
        from evalkit.policies.pi05.checkpoint import find_norm_stats, read_norm_stats_json

        saved, _ = read_norm_stats_json(find_norm_stats(resume))
        stats = {k: saved[k] for k in ("state", "actions", "features") if k in saved}
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = resolve_device(cfg.get("device", "auto"))
    torch.backends.cuda.matmul.allow_tf32 = True

    images = inputs_of(cfg) == "images"
    acts = torch.from_numpy(normalize_actions(packed["actions"], stats, float(cfg.get("action_clip", 1.5)))).to(dev)
    chunks = torch.from_numpy(packed["chunks"]).to(dev)
    instr = torch.from_numpy(packed["instr_ids"]).to(dev)
    if images:
        views = torch.from_numpy(packed["images"]).to(dev)  # uint8 on the device; floats made per batch
        feats = None
        mcfg = model_config(cfg, 0)
        # the prompt carries each step's binned state, so every sample has its own tokens (computed once)
        from evalkit.policies.pi05 import processing as proc

        norm_state = proc.QuantileStats(np.asarray(stats["state"]["q01"], np.float32),
                                        np.asarray(stats["state"]["q99"], np.float32)).normalize(packed["states"])
        texts = [str(packed["instructions"][i]) for i in packed["instr_ids"]]
        tok, mask = proc.tokenize_batch(proc.ByteTokenizer(mcfg.vocab_size), texts, norm_state, mcfg.max_token_len,
                                        False)
        longest = int(mask.sum(1).max())
        if longest >= mcfg.max_token_len:
            raise BadInput(f"prompts reach max_token_len={mcfg.max_token_len}: raise model.max_token_len")
    else:
        feats = torch.from_numpy(normalize_features(packed["features"], stats)).to(dev)
        mcfg = model_config(cfg, feats.shape[1])
        tok, mask = tokenize(list(packed["instructions"]), mcfg.vocab_size, mcfg.max_token_len)
    tok_t, mask_t = torch.from_numpy(tok).to(dev), torch.from_numpy(mask).to(dev)
    shift = int(cfg.get("augment_shift") or 0)

    # Hold out whole episodes for a validation loss (same noise/time draws every evaluation).
    n_ep = len(packed["lengths"])
    val_eps = set(rng.choice(n_ep, size=max(1, int(n_ep * cfg.get("val_fraction", 0.05))), replace=False).tolist())
    is_val = np.isin(packed["episode_ids"], list(val_eps))
    train_idx = torch.from_numpy(np.flatnonzero(~is_val)).to(dev)
    val_idx = torch.from_numpy(np.flatnonzero(is_val)[: 512 if images else 4096]).to(dev)  # one batch's memory

    with torch.device(dev):
        model = Pi05Model(mcfg)
    model.init_random(seed=seed, std=0.02)
    with torch.no_grad():  # openpi zero-inits adaRMS modulation: start every expert branch as identity
        for name, p in model.named_parameters():
            if ".dense." in name or name.endswith("modulation.weight") or "norm.dense" in name:
                p.zero_()
    if resume is not None:
        from evalkit.policies.pi05.checkpoint import load_state_dict_into

        try:
            load_state_dict_into(model, resume)  # the loader of policy=pi05: strict keys and shapes
        except BadInput as e:
            raise BadInput(f"init_from: {e}") from None
        print(f"resumed weights and normalization statistics from {resume}", flush=True)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 1e-4),
                            betas=(0.9, 0.95), fused=dev.type == "cuda")  # one kernel for all parameters
    steps, warmup, bs = int(cfg["steps"]), int(cfg.get("warmup", 200)), int(cfg["batch_size"])

    def lr_at(s: int) -> float:
        if s < warmup:
            return cfg["lr"] * (s + 1) / warmup
        return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))

    gen = torch.Generator(device=dev).manual_seed(seed)
    # Every batch has the same shapes and nothing in a step reads a value back from the device: the prompts are cut
    # to the longest of the whole set once (not per batch, which cost two device syncs a step), batch indices and
    # flow times are drawn on the device. A small model is launch-bound, so a step without syncs overlaps the host's
    # launches with the device's work; static shapes also let `compile` build one graph.
    cols = int(mask.sum(1).max())
    tok_t, mask_t = tok_t[:, :cols].contiguous(), mask_t[:, :cols].contiguous()
    full_prompts = bool(mask[:, :cols].all())

    def batch(idx: torch.Tensor, augment: bool):
        ii = idx if images else instr[idx]  # image prompts are per sample, state_tokens prompts per instruction
        inputs = {"state_features": feats[idx]} if feats is not None else {}
        if images:
            from evalkit.policies.pi05.processing import images_to_model

            x = images_to_model(views[idx])
            inputs["images"] = shift_views(x, shift, gen) if augment else x
        return tok_t[ii], (None if full_prompts else mask_t[ii]), acts[chunks[idx]], inputs

    amp = bool(cfg.get("amp"))

    def flow_loss(net, tokens, tmask, a, noise, t, inputs) -> torch.Tensor:
        # bf16 autocast lets attention take the fused kernels (the vision tower's 392 image tokens a sample)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            return net.flow_matching_loss(tokens, tmask, a, noise=noise, time=t, **inputs).float()

    compiled = None
    if cfg.get("compile"):
        compiled = torch.compile(flow_loss, dynamic=False)

    def loss_on(idx: torch.Tensor, noise_gen: torch.Generator, augment: bool = True, net=None) -> torch.Tensor:
        tokens, tmask, a, inputs = batch(idx, augment)
        noise = torch.randn(a.shape, generator=noise_gen, device=dev)
        # t ~ Beta(1.5, 1) (openpi's flow times) by its inverse CDF u**(1/1.5), drawn on the device
        t = torch.rand(len(idx), generator=noise_gen, device=dev) ** (1 / 1.5) * 0.999 + 0.001
        fn = compiled if (net is None and compiled is not None) else flow_loss
        return fn(model if net is None else net, tokens, tmask, a, noise, t, inputs)

    # the weights validated and saved: the EMA copy when ema_decay is set, else the trained weights themselves
    ema_decay = float(cfg.get("ema_decay") or 0)
    if not 0 <= ema_decay <= 1:
        raise BadInput(f"ema_decay must be in [0, 1] (0: no average), got {ema_decay}")
    ema_model = None
    if ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema_model = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    kept = model if ema_model is None else ema_model.module

    def val_loss() -> float:
        kept.eval()
        g = torch.Generator(device=dev).manual_seed(12345)  # the same noise and times at every evaluation
        with torch.no_grad():
            v = float(loss_on(val_idx, g, augment=False, net=kept))
        model.train()
        return v

    log: list[dict[str, float]] = []
    max_seconds = float(cfg.get("max_seconds") or 0)
    t0 = time.time()
    ema = None
    done = 0
    print(f"device={dev} params={params} train_steps={len(train_idx)} val_steps={len(val_idx)} episodes={n_ep}", flush=True)
    planned = steps
    s = 0
    while s < steps:
        if s == FIT_WARMUP_STEPS:
            t_warm = time.time()
        if s == FIT_PROBE_STEPS and max_seconds and not cfg.get("stop_after"):
            # a time-limited run lays its lr schedule over the steps that fit, so it ends annealed, not cut mid-way:
            # the time left at the rate of the steps after the warm-up ones
            rate = (s - FIT_WARMUP_STEPS) / (time.time() - t_warm)
            fit = s + int(rate * (max_seconds * 0.97 - (time.time() - t0)))
            if fit < steps:
                steps = max(fit, s + 1)
                print(f"schedule: {steps} steps fit in max_seconds={max_seconds} (of {planned} configured)", flush=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        pick = torch.randint(len(train_idx), (bs,), generator=gen, device=dev)
        opt.zero_grad(set_to_none=True)
        try:  # the first step compiles the forward and (at backward) the backward graph
            loss = loss_on(train_idx[pick], gen)
            loss.backward()
        except Exception as e:  # noqa: BLE001 - a compiler failure costs speed, not the session's training
            if compiled is None or s > 0:
                raise
            print(f"compile=true failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training eager",
                  flush=True)
            compiled = None
            opt.zero_grad(set_to_none=True)
            loss = loss_on(train_idx[pick], gen)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ema_model is not None:
            ema_model.update_parameters(model)
        done = s + 1
        lv = float(loss.detach()) if (s % 50 == 0 or s == steps - 1) else None
        if lv is not None:
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        if s % int(cfg.get("log_every", 500)) == 0 or s == steps - 1:
            row = {"step": s, "loss": lv, "val_loss": val_loss(), "lr": lr_at(s), "seconds": round(time.time() - t0, 1)}
            log.append(row)
            print(json.dumps(row), flush=True)
        if cfg.get("stop_after") and done >= int(cfg["stop_after"]):
            print(f"stopping at step {done}: stop_after reached (schedule laid out for {steps} steps)", flush=True)
            break
        if max_seconds and time.time() - t0 > max_seconds:
            print(f"stopping at step {done}: max_seconds={max_seconds} reached", flush=True)
            break
        s += 1
    final = {"step": done, "val_loss": val_loss(), "seconds": round(time.time() - t0, 1)}
    log.append(final)
    out = Path(cfg["out"])
    kept.eval()
    norm = {k: stats[k] for k in ("state", "actions", "features") if k in stats}
    save_checkpoint(kept.cpu(), out, norm_stats=norm, asset_id="libero_images" if images else "libero_state")
    run_cfg = {**cfg, "steps": steps, "steps_done": done}  # steps: the schedule as run (replayable with max_seconds=0)
    (out / "train_config.yaml").write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    summary = {"params": params, "device": str(dev), "torch": torch.__version__, "episodes": n_ep,
               "samples": int(len(acts)), "instructions": list(map(str, packed["instructions"])),
               "steps_done": done, "steps_planned": planned, "steps_scheduled": steps, "log": log}
    (out / "train_log.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out} ({done} steps, {final['seconds']} s, final val_loss {final['val_loss']:.4f})", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    if cfg.get("pack_only"):
        pack(cfg)
        return 0
    fit(cfg)
    return 0


if __name__ == "__main__":
    from evalkit.errors import exit_with

    exit_with(main)
