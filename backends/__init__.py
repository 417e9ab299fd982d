"""Quantization/precision backends. One module per backend; `registry.get_backend(name)` builds one."""
