"""Policies: the `Policy` contract (base.py) and one module per policy; `registry.build_policy` builds one."""
