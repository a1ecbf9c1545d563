"""The rank layout table (`groups.layout`, printed by the dry run): rank order and refused degrees.
test_lora_parallel checks the same table against the groups megatron builds."""

from __future__ import annotations

import pytest

from megalora.config import ConfigError
from megalora.parallel.groups import layout


def test_layout_follows_megatron_rank_order() -> None:
    rows = layout(8, tp=2, ep=4, num_experts=8)
    # tp fastest, then dp; the expert grid: ep fastest, then expert-dp
    assert [r["tp_rank"] for r in rows] == [0, 1] * 4
    assert [r["dp_rank"] for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r["ep_rank"] for r in rows] == [0, 1, 2, 3] * 2
    assert [r["expert_dp_rank"] for r in rows] == [0] * 4 + [1] * 4
    assert rows[5]["experts"] == [2, 3]
    # with expert TP the expert grid is etp fastest, then ep, then expert-dp
    rows = layout(8, tp=2, ep=2, etp=2, num_experts=4)
    assert [r["etp_rank"] for r in rows] == [0, 1] * 4
    assert [r["ep_rank"] for r in rows] == [0, 0, 1, 1] * 2
    assert [r["expert_dp_rank"] for r in rows] == [0] * 4 + [1] * 4
    assert rows[3]["experts"] == [2, 3]


def test_layout_rejects_bad_degrees() -> None:
    with pytest.raises(ConfigError, match="world size 4 is not divisible by `tensor_model_parallel_size`=3"):
        layout(4, tp=3, ep=1, num_experts=4)
    with pytest.raises(ConfigError, match="`expert_model_parallel_size`=4 does not divide the 6 experts"):
        layout(4, tp=1, ep=4, num_experts=6)
    with pytest.raises(ConfigError, match="`expert_model_parallel_size`=2 x `expert_tensor_parallel_size`=4"):
        layout(4, tp=2, ep=2, etp=4, num_experts=4)
    with pytest.raises(ConfigError, match="`expert_model_parallel_size`=2 but the model has no experts"):
        layout(2, tp=1, ep=2, num_experts=0)
