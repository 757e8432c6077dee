"""Token-budget planning (``batching.planning``): how the ingress and the corpus job group inputs."""

from __future__ import annotations

import pytest

from serve_app.batching.planning import plan_batches

pytestmark = pytest.mark.unit


def test_plan_batches_fits_budget_and_keeps_long_inputs_alone():
    lengths = [5, 300, 40, 41, 1000, 39, 7]
    batches = plan_batches(lengths, max_batch_tokens=128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 128
    assert [4] in batches and [1] in batches


def test_plan_batches_packed_costs_only_real_tokens():
    lengths = [5, 300, 40, 41, 1000, 39, 7]
    batches = plan_batches(lengths, max_batch_tokens=128, packed=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or sum(lengths[i] for i in batch) <= 128
    assert [2, 3, 5, 6] in [sorted(b) for b in batches]  # 41+40+39+7 = 127: no padding to pay for
