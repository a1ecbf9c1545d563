"""LoRA shard/gather plans: slices follow the base layer's split; gather undoes shard."""
from __future__ import annotations

import pytest
import torch

from megalora.train.lora.layout import gather_lora_state, shard_lora_state

LAYOUT = {
    "a.lora_A": "replicated", "a.lora_B": "column", "fc1.lora_B": "glu_column", "proj.lora_A": "row",
    "experts.lora_fc1_A": "expert", "in_proj.lora_B": "segments:4,4,8,8,2,2",
}


def _full() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"a.lora_A": (3, 6), "a.lora_B": (8, 3), "fc1.lora_B": (8, 3), "proj.lora_A": (3, 6),
              "experts.lora_fc1_A": (4, 3, 6), "in_proj.lora_B": (28, 3)}
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_gather_undoes_shard(tp: int, ep: int) -> None:
    full = _full()
    rows = [{"tp_rank": r % tp, "ep_rank": r % ep} for r in range(max(tp, ep))]
    parts = [shard_lora_state(full, LAYOUT, tp_rank=row["tp_rank"], tp_size=tp, ep_rank=row["ep_rank"], ep_size=ep)
             for row in rows]
    back = gather_lora_state(parts, LAYOUT, rows=rows, tp_size=tp, ep_size=ep)
    assert back.keys() == full.keys()
    for key in full:
        assert torch.equal(back[key], full[key]), key


def test_each_kind_holds_the_base_layers_slice() -> None:
    full = _full()
    r1 = shard_lora_state(full, LAYOUT, tp_rank=1, tp_size=2, ep_rank=1, ep_size=2)
    assert torch.equal(r1["a.lora_A"], full["a.lora_A"])
    assert torch.equal(r1["a.lora_B"], full["a.lora_B"][4:])
    assert torch.equal(r1["fc1.lora_B"], torch.cat([full["fc1.lora_B"][2:4], full["fc1.lora_B"][6:8]]))
    assert torch.equal(r1["proj.lora_A"], full["proj.lora_A"][:, 3:])
    assert torch.equal(r1["experts.lora_fc1_A"], full["experts.lora_fc1_A"][2:])
    b = full["in_proj.lora_B"]  # parts q 0:4, k 4:8, v 8:16, z 16:24, b 24:26, a 26:28
    want = torch.cat([b[2:4], b[6:8], b[12:16], b[20:24], b[25:26], b[27:28]])
    assert torch.equal(r1["in_proj.lora_B"], want)
    with pytest.raises(ValueError, match="lacks"):
        shard_lora_state({}, LAYOUT, tp_rank=0, tp_size=1, ep_rank=0, ep_size=1)
