"""Packing on the model side: packed samples never see each other, in full attention and in
Gated DeltaNet (state reset at each boundary)."""
import numpy as np
import pytest
import torch

from megalora.data.pack import collate


@pytest.fixture(scope="module")
def model(train_assets):
    from megalora.parallel import groups
    from megalora.train.model.build import build_model

    groups.initialize()
    built, info = build_model(train_assets.model_dir)
    assert [type(l.self_attention).__name__ for l in built.decoder.layers] == ["GatedDeltaNet", "SelfAttention"]
    yield built.eval()
    groups.destroy()


def _samples(seed, lengths=(37, 70, 23)):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(3, 1500, n)
        labels = ids.copy()
        labels[0] = -100
        out.append((ids, labels))
    return out


def _token_losses(model, batch, *, packed):
    from megalora.train.step import forward_loss

    with torch.no_grad():
        losses, mask = forward_loss(model, batch, device=torch.device("cpu"), packed=packed)
    return losses.reshape(batch["input_ids"].shape), mask.reshape(batch["input_ids"].shape)


def test_packed_token_losses_equal_unpacked(model):
    samples = _samples(0)
    packed = collate([samples], pad_token_id=0)  # one row holding the three samples
    unpacked = collate([[s] for s in samples], pad_token_id=0)  # three right-padded rows
    p_loss, p_mask = _token_losses(model, packed, packed=True)
    u_loss, u_mask = _token_losses(model, unpacked, packed=False)
    start = 0
    for row, (ids, _) in enumerate(samples):
        n = len(ids)
        got, want = p_loss[0, start:start + n], u_loss[row, :n]
        m = u_mask[row, :n]
        assert torch.equal(p_mask[0, start:start + n], m)
        rel = (got[m] - want[m]).norm() / want[m].norm()
        assert rel <= 1e-5, (row, float(rel))
        start += n


def test_changing_one_sample_leaves_the_others_in_its_pack_unchanged(model):
    from megalora.train.step import packed_seq_params

    a = _samples(1)
    b = list(a)
    b[1] = (_samples(2, lengths=(70,))[0][0], a[1][1])  # same length, other tokens
    outs = []
    for samples in (a, b):
        batch = collate([samples], pad_token_id=0)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                           packed_seq_params=packed_seq_params(batch))
        outs.append(logits[0])
    first, second, third = slice(0, 37), slice(37, 107), slice(107, 130)
    assert torch.equal(outs[0][first], outs[1][first])
    assert torch.equal(outs[0][third], outs[1][third])
    assert not torch.allclose(outs[0][second], outs[1][second])
