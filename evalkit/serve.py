"""`python -m evalkit.serve policy=NAME [port=8000] [host=127.0.0.1] [device=cpu] [policy.KEY=VALUE ...]`

Serves any evalkit policy over openpi's websocket protocol, so `policy=remote` (or openpi's own
LIBERO client) can evaluate it from another process, container or machine:
- on connect the server sends its metadata (msgpack), then answers each request, one observation
  dict with openpi's LIBERO keys, with {"actions": float32 [H, 7], "server_timing": {"infer_ms",
  "prev_total_ms"}, "policy_timing": {"infer_ms"}};
- a request that fails gets the traceback as a text frame and the connection is closed (as openpi does);
- GET /healthz answers 200 (readiness probe).
Written for evalkit with the `websockets` package and openpi-client's msgpack-numpy codec.
"""

from __future__ import annotations

import asyncio
import http
import logging
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from evalkit.cli_args import opt, parse, split_group
from evalkit.config import CONF_DIR
from evalkit.errors import EXIT_BAD_INPUT, BadInput, CapabilityError
from evalkit.policies.base import ObsBatch, Observation
from evalkit.policies.remote import EPISODE_KEY, NOISE_SEED_KEY

CONF_POLICY = CONF_DIR / "policy"
log = logging.getLogger("evalkit.serve")


def load_policy_config(name: str, overrides: list[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = CONF_POLICY / f"{name}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in CONF_POLICY.glob("*.yaml") if p.stem != "remote")
        raise BadInput(f"unknown policy '{name}'; valid: {', '.join(valid)}")
    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    c = OmegaConf.to_container(cfg, resolve=True)
    if c.get("kind") == "remote":
        raise BadInput("evalkit.serve cannot serve policy=remote (it would call itself)")
    c.setdefault("name", name)  # denoise_steps left unset: the policy's default
    return c


def to_observation(req: dict[str, Any], n: int) -> Observation:
    missing = [k for k in ("observation/state", "prompt") if k not in req]
    if missing:
        raise ValueError(f"request misses {missing}; got keys {sorted(req)}")
    img, wrist = req.get("observation/image"), req.get("observation/wrist_image")
    return Observation(
        state=np.asarray(req["observation/state"], dtype=np.float32),
        instruction=str(req["prompt"]),
        episode_key=str(req.get(EPISODE_KEY, f"remote/{n}")),
        step=0,
        agentview=None if img is None else np.asarray(img, dtype=np.uint8),
        wrist=None if wrist is None else np.asarray(wrist, dtype=np.uint8),
        noise_seed=int(req[NOISE_SEED_KEY]) if NOISE_SEED_KEY in req else None,
    )


class PolicyServer:
    def __init__(self, policy, host: str = "127.0.0.1", port: int = 8000, metadata: dict | None = None):
        self.policy, self.host, self.port = policy, host, port
        self.metadata = {"evalkit_policy": policy.name, "action_horizon": int(policy.action_horizon),
                         "needs_images": bool(policy.needs_images), **(metadata or {})}
        self._episode: str | None = None
        self._requests = 0

    def infer(self, req: dict[str, Any]) -> dict[str, Any]:
        obs = to_observation(req, self._requests)
        self._requests += 1
        if obs.episode_key != self._episode:  # a new episode (keys only arrive with evalkit's extras)
            self.policy.reset(obs.episode_key)
            self._episode = obs.episode_key
        if self.policy.needs_images and (obs.agentview is None or obs.wrist is None):
            raise ValueError(f"policy '{self.policy.name}' needs observation/image and observation/wrist_image")
        t = time.monotonic()
        actions = np.asarray(self.policy.predict(ObsBatch([obs])), dtype=np.float32)[0]
        return {"actions": actions, "policy_timing": {"infer_ms": (time.monotonic() - t) * 1e3}}

    async def _handler(self, ws) -> None:
        import websockets
        from openpi_client import msgpack_numpy

        packer = msgpack_numpy.Packer()
        await ws.send(packer.pack(self.metadata))
        prev_total = None
        while True:
            try:
                t0 = time.monotonic()
                req = msgpack_numpy.unpackb(await ws.recv())
                t1 = time.monotonic()
                reply = self.infer(req)
                reply["server_timing"] = {"infer_ms": (time.monotonic() - t1) * 1e3}
                if prev_total is not None:
                    reply["server_timing"]["prev_total_ms"] = prev_total * 1e3
                await ws.send(packer.pack(reply))
                prev_total = time.monotonic() - t0
            except websockets.ConnectionClosed:
                return
            except Exception:
                log.exception("request failed")
                await ws.send(traceback.format_exc())
                await ws.close(code=1011, reason="policy error; traceback in the previous frame")
                return

    @staticmethod
    def _health(connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    async def run(self, ready: asyncio.Event | None = None) -> None:
        from websockets.asyncio.server import serve

        async with serve(self._handler, self.host, self.port, compression=None, max_size=None,
                         process_request=self._health) as server:
            self.port = server.sockets[0].getsockname()[1]  # port=0: the OS picked one
            print(f"evalkit.serve: policy '{self.policy.name}' on ws://{self.host}:{self.port}", flush=True)
            if ready is not None:
                ready.set()
            await server.serve_forever()


@dataclass
class ServeOptions:
    policy: str = opt(help="the policy to serve: a conf/policy/<name>.yaml (not remote)")
    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "port to listen on (0: any free port)")
    device: str = opt("cpu", "auto | cpu | cuda | cuda:N")


def parse_args(argv: list[str]) -> tuple[ServeOptions, list[str]]:
    """(options, policy overrides "KEY=VALUE" from policy.KEY=VALUE)."""
    rest, overrides = split_group(argv, "policy")
    opts = parse(ServeOptions, rest, prog="python -m evalkit.serve",
                 about="serve an evalkit policy over openpi's websocket protocol",
                 extra=[("policy.KEY", "override a key of the policy's yaml, e.g. policy.denoise_steps=5")])
    return opts, overrides


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, overrides = parse_args(argv)
        name = opts.policy
        cfg = load_policy_config(name, overrides)
        import torch

        from evalkit.config import resolve_device
        from evalkit.policies.registry import build_policy

        device = resolve_device(opts.device)
        policy = build_policy(cfg, torch.device(device))
    except (BadInput, CapabilityError) as e:
        print(f"evalkit.serve: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    server = PolicyServer(policy, opts.host, opts.port, metadata={"device": device, "evalkit_config": name})
    try:
        asyncio.run(server.run())
    except KeyboardInterrupt:
        pass
    except OSError as e:  # port in use, bad host
        print(f"evalkit.serve: error: cannot listen on {opts.host}:{opts.port}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
