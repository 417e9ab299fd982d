"""Rollouts: worker processes own LIBERO envs; the main process batches policy calls across them."""
