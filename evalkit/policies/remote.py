"""`policy=remote`: a policy served by another process or container over openpi's websocket protocol.

The wire format is openpi's (openpi-client's `WebsocketClientPolicy`: msgpack with numpy arrays, the
server sends its metadata first, then answers one observation dict per request). The request keys
are those of openpi's LIBERO example (examples/libero/main.py):
    observation/image        agentview, uint8 [224, 224, 3], rotated 180° and resized with padding
    observation/wrist_image  wrist camera, same processing
    observation/state        eef pos (3) + eef axis-angle (3) + gripper qpos (2)
    prompt                   the task instruction
evalkit's env adapter already applies exactly that processing, so observations map 1:1.

Timing is kept in two separate streams: the client-side round trip of every request (what the
rollouts wait for: network + serialization + server) and the server's own fields
(`server_timing.infer_ms`, `server_timing.prev_total_ms`, `policy_timing.infer_ms` when present).
`last_timing` holds the latest batch, `timing_summary()` all of them.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from evalkit.errors import BadInput, CapabilityError
from evalkit.policies.base import ObsBatch, Observation

# Optional request keys only evalkit's own server reads (openpi's LIBERO transforms drop unknown keys).
NOISE_SEED_KEY = "evalkit/noise_seed"
EPISODE_KEY = "evalkit/episode_key"


def to_request(obs: Observation, with_images: bool, extras: bool, noise_seed: int | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"observation/state": np.asarray(obs.state), "prompt": str(obs.instruction)}
    if with_images:
        if obs.agentview is None or obs.wrist is None:
            raise ValueError("remote policy needs camera images but the observation has none")
        req["observation/image"] = np.ascontiguousarray(obs.agentview, dtype=np.uint8)
        req["observation/wrist_image"] = np.ascontiguousarray(obs.wrist, dtype=np.uint8)
    if extras:
        seed = noise_seed if noise_seed is not None else obs.noise_seed
        if seed is not None:
            req[NOISE_SEED_KEY] = int(seed)
        req[EPISODE_KEY] = obs.episode_key
    return req


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p90, p99 = np.percentile(np.asarray(values, dtype=float), [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(np.mean(values)), "n": len(values)}


class RemotePolicy:
    name = "remote"
    needs_privileged = False

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 needs_images: bool = True, action_horizon: int = 10, connect_timeout_s: float = 30.0,
                 evalkit_extras: bool = False, name: str = "remote"):
        self.name = name
        self.host, self.port = host, int(port)
        self.needs_images = bool(needs_images)
        self.action_horizon = int(action_horizon)
        self.evalkit_extras = bool(evalkit_extras)
        self.client = self._connect(api_key, connect_timeout_s)
        self.server_metadata: dict = self.client.get_server_metadata() or {}
        self.last_timing: dict[str, list[float]] = {}
        self._timing: dict[str, list[float]] = {"client_roundtrip_ms": [], "server_infer_ms": [],
                                                "server_prev_total_ms": [], "policy_infer_ms": []}

    def _connect(self, api_key: str | None, timeout_s: float):
        try:
            from openpi_client.websocket_client_policy import WebsocketClientPolicy
        except ImportError as e:
            raise CapabilityError("policy=remote needs openpi-client: pip install 'evalkit[remote]'") from e
        deadline, last = time.monotonic() + timeout_s, None
        while True:
            try:
                return WebsocketClientPolicy(self.host, self.port, api_key=api_key)
            except (OSError, TimeoutError) as e:  # server not up yet: retry until the deadline
                last = e
            if time.monotonic() >= deadline:
                raise BadInput(f"policy=remote: no policy server at ws://{self.host}:{self.port} after {timeout_s:.0f} s "
                               f"({type(last).__name__}: {last}); start one, e.g. python -m evalkit.serve policy=<name> "
                               f"port={self.port}")
            time.sleep(0.5)

    def predict(self, batch: ObsBatch, noise_seed: int | None = None) -> np.ndarray:
        """One request per observation (openpi servers take unbatched observations), in order."""
        chunks, timing = [], {k: [] for k in self._timing}
        for i, obs in enumerate(batch.observations):
            req = to_request(obs, self.needs_images, self.evalkit_extras, None if noise_seed is None else noise_seed + i)
            t0 = time.perf_counter()
            reply = self.client.infer(req)  # a server-side error arrives as a RuntimeError with its traceback
            timing["client_roundtrip_ms"].append((time.perf_counter() - t0) * 1e3)
            server = reply.get("server_timing") or {}
            for src, dst in (("infer_ms", "server_infer_ms"), ("prev_total_ms", "server_prev_total_ms")):
                if server.get(src) is not None:
                    timing[dst].append(float(server[src]))
            pol = reply.get("policy_timing") or {}
            if pol.get("infer_ms") is not None:
                timing["policy_infer_ms"].append(float(pol["infer_ms"]))
            actions = np.asarray(reply["actions"], dtype=np.float32)
            if actions.ndim != 2 or actions.shape[1] != 7:
                raise ValueError(f"remote policy at {self.host}:{self.port} returned actions of shape {actions.shape}; "
                                 f"expected [H, 7] (LIBERO's action space)")
            chunks.append(actions)
        if len({c.shape[0] for c in chunks}) > 1:
            raise ValueError(f"remote policy returned chunks of different lengths {[c.shape[0] for c in chunks]}")
        self.last_timing = timing
        for k, v in timing.items():
            self._timing[k].extend(v)
        return np.stack(chunks)

    def reset(self, episode_key: str) -> None:
        return None  # the episode key travels with each request when evalkit_extras is on

    def timing_summary(self) -> dict[str, Any]:
        """Client round trip and the server's own fields, kept apart (ms; p50/p90/p99/mean/n)."""
        out: dict[str, Any] = {k: _percentiles(v) for k, v in self._timing.items()}
        rt, srv = out["client_roundtrip_ms"], out["server_infer_ms"]
        if rt and srv:
            out["overhead_ms_p50"] = rt["p50"] - srv["p50"]  # network + (de)serialization, as the client sees it
        out["server"] = f"ws://{self.host}:{self.port}"
        out["server_metadata"] = {k: v for k, v in self.server_metadata.items() if isinstance(v, (str, int, float, bool))}
        return out


def build(cfg: dict, device) -> RemotePolicy:
    return RemotePolicy(
        host=str(cfg.get("host", "127.0.0.1")), port=int(cfg.get("port", 8000)), api_key=cfg.get("api_key"),
        needs_images=bool(cfg.get("needs_images", True)), action_horizon=int(cfg.get("action_horizon", 10)),
        connect_timeout_s=float(cfg.get("connect_timeout_s", 30)), evalkit_extras=bool(cfg.get("evalkit_extras", False)),
        name=str(cfg.get("name", "remote")),
    )
