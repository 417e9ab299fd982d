"""Backend name -> class. Custom backends come by import path (`backend.target=pkg.module.Class`).

A custom target is user code by design: importing it runs its module (docs/backends.md, trust model). The class is
checked to be a Backend subclass right after the import; an import that fails is one line (exit 2). The name table
imports no backend module and not torch, so the CLI can list and check names cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evalkit.errors import BadInput
from evalkit.imports import import_object

if TYPE_CHECKING:
    from evalkit.backends.base import Backend

BACKENDS: dict[str, str] = {
    "bf16": "evalkit.backends.casts:BF16Backend",
    "fp16": "evalkit.backends.casts:FP16Backend",
    "fp32": "evalkit.backends.casts:FP32Backend",
    "fp8": "evalkit.backends.fp8:FP8Backend",
    "fp8_weight_only": "evalkit.backends.fp8:FP8WeightOnlyBackend",
    "int8": "evalkit.backends.int8:Int8Backend",
    "int8_weight_only": "evalkit.backends.int8:Int8WeightOnlyBackend",
    "int4": "evalkit.backends.int4:Int4Backend",
    "sparse24": "evalkit.backends.sparse24:Sparse24Backend",
    "torch_trt_fp8": "evalkit.backends.torch_trt_fp8:TorchTRTFP8Backend",
    "nvfp4": "evalkit.backends.fp4:NVFP4Backend",
    "w4a8": "evalkit.backends.fp4:W4A8Backend",
    "fault_shared_layer_weights": "evalkit.backends.faults:SharedLayerWeightsFault",
    "fault_drop_mlp_residual": "evalkit.backends.faults:DropMLPResidualFault",
    "fault_ignored_scale": "evalkit.backends.faults:IgnoredScaleFault",
    "fault_silent_fallback": "evalkit.backends.faults:SilentFallbackFault",
    "fault_state_across_calls": "evalkit.backends.faults:StateAcrossCallsFault",
    "fault_calibration_ranges": "evalkit.backends.faults:CalibrationRangesFault",
    "fault_layer_order": "evalkit.backends.faults:LayerOrderFault",
    "fault_uncounted_denoise": "evalkit.backends.faults:UncountedDenoiseFault",
    "fault_scale_axis": "evalkit.backends.faults:ScaleAxisFault",
    "fault_rope_offset": "evalkit.backends.faults:RopeOffsetFault",
    "fault_drop_attn_residual": "evalkit.backends.faults:DropAttnResidualFault",
}


def backend_names() -> list[str]:
    return sorted(BACKENDS)


def backend_class(name: str, target_path: str | None = None) -> type[Backend]:
    """The class of a registered backend, or of a custom one by import path ("pkg.module.Class")."""
    from evalkit.backends.base import Backend

    path = target_path or BACKENDS.get(name)
    if path is None:
        raise BadInput(f"unknown backend '{name}'; valid: {', '.join(backend_names())} (or backend.target=pkg.module.Class)")
    try:
        cls = import_object(path)
    except BadInput:
        raise
    except Exception as e:  # a custom module that fails while importing: the user's code, one line
        raise BadInput(f"backend.target={path}: importing it failed ({type(e).__name__}: {e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BadInput(f"'{path}' (a {type(cls).__name__}) is not a evalkit.backends.base.Backend subclass")
    return cls


def get_backend(name: str, target_path: str | None = None, **options: Any) -> Backend:
    """Build a backend by registered name, or by `target_path` ("pkg.module.Class") for custom ones."""
    return backend_class(name, target_path)(**options)


def backend_from_config(cfg: Any) -> Backend:
    """Build a backend from the `backend` config group (name, targets, engine, inner, target, options).

    `engine` and `inner` are passed only to backends whose constructor takes them; a non-default value
    for a backend that has no such knob is a BadInput (never silently ignored).
    """
    import inspect

    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    name = get("name")
    target = get("target", None) or get("_target_", None)
    options = dict(get("options", None) or {})
    cls = backend_class(name, target)
    params = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params |= set(inspect.signature(klass.__init__).parameters)
    kwargs: dict[str, Any] = {"targets": get("targets", None) or "prefix_mlp", **options}
    for key, default in (("engine", "native"), ("inner", None)):
        value = get(key, None)
        if key in params:
            if value is not None:
                kwargs[key] = value
        elif value not in (None, default):
            raise BadInput(f"backend '{name}' has no '{key}' setting (got {key}={value})")
    return cls(**kwargs)
