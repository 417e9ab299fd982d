"""LIBERO suite specs (specs.py) and the environment adapter (env.py)."""
