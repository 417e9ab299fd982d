"""π0.5 (PaliGemma + flow-matching action expert) in plain PyTorch; see docs/pi05.md."""

from evalkit.policies.pi05.config import Pi05Config, full_config, tiny_config
from evalkit.policies.pi05.model import Pi05Model

__all__ = ["Pi05Config", "Pi05Model", "full_config", "tiny_config"]
