"""Backends as a user writes them outside evalkit (passed with backend.target=tests.custom_backends.<Class>):
plain Backend subclasses that declare no precision class and write no notes."""

from __future__ import annotations

import torch
from evalkit.backends.base import Backend, BackendReport
from evalkit.backends.casts import describe_leaf_modules


class UserNoise(Backend):
    """bf16 with relative noise `scale` (default 1e-3) on every weight matrix: a healthy change the gate must pass."""

    name = "user_noise"

    def apply(self, model, calib=None):
        scale = float(self.options.get("scale", 1e-3))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.add_(p * scale * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
        model.to(torch.bfloat16)
        return BackendReport(backend=self.name, device=str(next(model.parameters()).device),
                             modules=describe_leaf_modules(model, "bf16"))
