"""π0.5 under CUDA graphs: batches pad to the next power of two and prompts to max_token_len, so batches of any
size and prompt mix capture at most one graph key per power of two, and each row's actions are those of the eager
policy. Run on the device machine: `pytest -m gpu tests/test_pi05_graphs_gpu.py`."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["pick up the black bowl", "put the black bowl on the plate next to the cookie box",
           "open the top drawer and put the bowl inside"]


def test_graph_keys_are_bounded_and_rows_match_eager():
    from evalkit.policies.base import ObsBatch
    from evalkit.policies.pi05.graphs import batch_bucket
    from evalkit.policies.pi05.policy import build
    from evalkit.policies.pi05.testing import TINY, make_obs

    graphed = build({**TINY, "dtype": "float32", "cuda_graph": True}, torch.device("cuda"))
    sizes = [1, 3, 5, 2, 16, 7, 4, 11, 1]
    for n in sizes:
        obs = ObsBatch([make_obs(100 * n + i, instruction=PROMPTS[(n + i) % 3]) for i in range(n)])
        a = graphed.predict(obs, noise_seed=n)
        with graphed.eager():  # the same weights eagerly, prompts padded to the batch's longest, no padded rows
            b = graphed.predict(obs, noise_seed=n)
        assert a.shape == b.shape == (n, graphed.action_horizon, 7)
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-3, atol=1e-3)
    assert graphed._graphs.captures == len({batch_bucket(n) for n in sizes}) == 5  # 1, 2, 4, 8, 16
    assert graphed._graphs.capture_s > 0
