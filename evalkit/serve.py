"""`python -m evalkit.serve policy=NAME [port=8000] [host=127.0.0.1] [device=cpu] [policy.KEY=VALUE ...]`

Serves any evalkit policy over openpi's websocket protocol, so `policy=remote` (or openpi's own
LIBERO client) can evaluate it from another process, container or machine:
- on connect the server sends its metadata (msgpack), then answers each request, one observation
  dict with openpi's LIBERO keys, with {"actions": float32 [H, 7], "server_timing": {"infer_ms",
  "prev_total_ms"}, "policy_timing": {"infer_ms"}};
- a request that fails gets one short text frame, the exception's type and first line with file paths blanked
  out, and the connection is closed (openpi sends the whole traceback; its client raises either way); the
  traceback goes to the server's log only;
- a message over `max_message_mb` (default 8 MiB: two 224x224 RGB views are 0.3 MB) is refused by the websocket
  layer itself with close code 1009 before it is decoded; the server logs the refusal;
- GET /healthz answers 200 (readiness probe).
Written for evalkit with the `websockets` package and openpi-client's msgpack-numpy codec.
Trust model: anyone who can reach the port can run the policy on inputs of their choosing, and nothing more.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from evalkit.cli_args import opt, parse, split_group
from evalkit.config import load_policy_file
from evalkit.errors import EXIT_BAD_INPUT, BadInput, CapabilityError
from evalkit.policies.base import ObsBatch, Observation
from evalkit.policies.remote import EPISODE_KEY, NOISE_SEED_KEY

DEFAULT_MAX_MESSAGE_MB = 8.0
log = logging.getLogger("evalkit.serve")
# A path not glued to a word: "/home/u/x.py", "./a/b", "~/a", "C:\\x\\y"; not "observation/image" nor "1.5/2".
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:|~|\.{1,2})?(?:[\\/][\w.~-]+)+")


def client_error(e: BaseException, limit: int = 300) -> str:
    """What a client is told about a failed request: the exception type and its first line, paths blanked."""
    first = (str(e).strip().splitlines() or [""])[0]
    text = f"{type(e).__name__}: {_PATH.sub('<path>', first)}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_policy_config(name: str, overrides: list[str]) -> dict[str, Any]:
    c = load_policy_file(name, overrides)
    if c.get("kind") == "remote":
        raise BadInput("evalkit.serve cannot serve policy=remote (it would call itself)")
    return c  # denoise_steps left unset: the policy's default


def to_observation(req: dict[str, Any], n: int) -> Observation:
    if not isinstance(req, dict):
        raise ValueError(f"a request must be a msgpack map of openpi's LIBERO keys, got {type(req).__name__}")
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
    def __init__(self, policy, host: str = "127.0.0.1", port: int = 8000, metadata: dict | None = None,
                 max_message_mb: float = DEFAULT_MAX_MESSAGE_MB):
        if not max_message_mb > 0:
            raise BadInput(f"evalkit.serve: max_message_mb must be > 0, got {max_message_mb}")
        self.policy, self.host, self.port = policy, host, port
        self.max_message_bytes = int(max_message_mb * 2**20)
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
            except websockets.ConnectionClosed as e:
                if e.sent is not None and e.sent.code == 1009:  # the websocket layer refused an oversized message
                    log.warning("refused a message from %s over max_message_mb (%d bytes): %s",
                                ws.remote_address, self.max_message_bytes, e.sent.reason)
                return
            except Exception as e:
                log.exception("request from %s failed", ws.remote_address)  # the traceback stays here
                await ws.send(client_error(e))
                await ws.close(code=1011, reason="policy error; details in the previous frame")
                return

    @staticmethod
    def _health(connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    async def run(self, ready: asyncio.Event | None = None) -> None:
        from websockets.asyncio.server import serve

        async with serve(self._handler, self.host, self.port, compression=None, max_size=self.max_message_bytes,
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
    max_message_mb: float = opt(DEFAULT_MAX_MESSAGE_MB, "largest request accepted (MiB); larger ones are refused")


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
        if not opts.max_message_mb > 0:
            raise BadInput(f"max_message_mb must be > 0, got {opts.max_message_mb}")
        name = opts.policy
        cfg = load_policy_config(name, overrides)
        import torch

        from evalkit.config import resolve_device
        from evalkit.policies.registry import build_policy, precheck_policy

        device = resolve_device(opts.device)
        precheck_policy(cfg)  # files, tokenizer, settings: before a heavy policy is built
        policy = build_policy(cfg, torch.device(device))
    except (BadInput, CapabilityError) as e:
        print(f"evalkit.serve: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    server = PolicyServer(policy, opts.host, opts.port, metadata={"device": device, "evalkit_config": name},
                          max_message_mb=opts.max_message_mb)
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
