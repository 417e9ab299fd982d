"""CUDA-graph capture of a π0.5 call: three graphs (encode, prefill, the whole denoise loop), replayed back to back.

Three graphs instead of one keep per-stage timing possible; each replay is one launch, so the call costs
three launches plus the copies of its inputs into the static buffers. Graphs are keyed by input shapes
and the number of denoise steps; the first call of a new key captures (a few warm-up runs first, ~0.6 s at
true size). A batch is padded to the next power of two (copies of its first row, dropped from the output), and
the policy pads prompts to `max_token_len` under graphs, so a night of batches of 1..16 captures at most five
keys instead of one per (batch size, longest prompt) pair.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from evalkit.errors import CapabilityError
from evalkit.latency.timer import NullTimer
from evalkit.policies.pi05.model import Pi05Model


@dataclass
class _Captured:
    graphs: dict[str, torch.cuda.CUDAGraph]
    inputs: dict[str, torch.Tensor | None]
    output: torch.Tensor
    steps: int
    keep: tuple  # intermediates read across graphs (prefix embeddings, KV cache): must outlive capture


class GraphedSampler:
    def __init__(self, model: Pi05Model, device: torch.device) -> None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise CapabilityError(f"pi05 cuda_graph=true needs a CUDA GPU; device is {device}")
        self.model = model
        self.device = device
        self._cache: dict[tuple, _Captured] = {}
        self.captures = 0  # keys captured so far, and the seconds that took (warm-ups included)
        self.capture_s = 0.0

    @staticmethod
    def _key(inputs: dict[str, torch.Tensor | None], steps: int) -> tuple:
        shapes = tuple((k, None if v is None else (tuple(v.shape), v.dtype)) for k, v in sorted(inputs.items()))
        return (steps, *shapes)

    def _capture(self, inputs: dict[str, torch.Tensor | None], steps: int) -> _Captured:
        m = self.model
        static = {k: (None if v is None else v.clone()) for k, v in inputs.items()}

        def encode():
            return m.embed_prefix(static["tokens"], static["token_mask"], images=static["images"],
                                  state_features=static["state_features"])

        calls_before = m.expert_calls
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # warm-up: lazy inits, cuBLAS handles, compile if enabled
                embs, mask = encode()
                cache = m.prefill(embs, mask)
                m.denoise(cache, static["noise"], steps)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graphs = {k: torch.cuda.CUDAGraph() for k in ("encode", "prefill", "denoise")}
        pool = torch.cuda.graph_pool_handle()  # one pool per key, shared by its three graphs (replayed in order)
        with torch.no_grad():
            with torch.cuda.graph(graphs["encode"], pool=pool):
                embs, mask = encode()
            with torch.cuda.graph(graphs["prefill"], pool=pool):
                cache = m.prefill(embs, mask)
            with torch.cuda.graph(graphs["denoise"], pool=pool):
                out = m.denoise(cache, static["noise"], steps)
        m.expert_calls = calls_before  # replays count below, not captures
        return _Captured(graphs=graphs, inputs=static, output=out, steps=steps, keep=(embs, mask, cache))

    @torch.no_grad()
    def run(self, inputs: dict[str, torch.Tensor | None], steps: int, timer=None) -> torch.Tensor:
        """inputs: tokens, token_mask, images, state_features, noise (None where absent). Returns a view of
        the static output: copy it before the next call."""
        timer = timer or NullTimer()
        rows = inputs["noise"].shape[0]
        inputs = pad_batch(inputs, batch_bucket(rows))
        key = self._key(inputs, steps)
        cap = self._cache.get(key)
        if cap is None:
            t0 = time.perf_counter()
            cap = self._cache[key] = self._capture(inputs, steps)
            torch.cuda.synchronize(self.device)
            self.captures += 1
            self.capture_s += time.perf_counter() - t0
        with timer.stage("encode"):
            for k, v in inputs.items():
                if v is not None:
                    cap.inputs[k].copy_(v, non_blocking=True)  # type: ignore[union-attr]
            cap.graphs["encode"].replay()
        with timer.stage("prefill"):
            cap.graphs["prefill"].replay()
        with timer.stage("denoise"):
            cap.graphs["denoise"].replay()
        self.model.expert_calls += steps
        return cap.output[:rows]


def batch_bucket(rows: int) -> int:
    """The batch a graph is captured for: the next power of two."""
    return 1 << (rows - 1).bit_length()


def pad_batch(inputs: dict[str, torch.Tensor | None], rows: int) -> dict[str, torch.Tensor | None]:
    """Every input padded along its batch dim to `rows` with copies of its first row."""
    out: dict[str, torch.Tensor | None] = {}
    for k, v in inputs.items():
        if v is None or v.shape[0] == rows:
            out[k] = v
        else:
            out[k] = torch.cat([v, v[:1].expand(rows - v.shape[0], *v.shape[1:])])
    return out
