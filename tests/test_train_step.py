"""The loss of a step is the mean over every trained token of the global batch."""
import pytest
import torch

from megalora.config import load_config


def _batch(rows, pad_id):
    """A micro-batch of (input_ids, labels) rows, right-padded, in the data pipeline's format."""
    from megalora.data.pack import collate

    return collate([[r] for r in rows], pad_token_id=pad_id)


def test_uneven_micro_batches_give_the_one_big_batch_gradient(train_assets):
    """Two micro-batches with 4 and 39 trained tokens accumulate exactly the gradient of the
    single micro-batch holding both samples (a mean of per-micro-batch means would weight
    the 4 tokens about 10x too much)."""
    import numpy as np

    from megalora.parallel import groups
    from megalora.train.lora.apply import apply_lora
    from megalora.train.lora.grads import reduce_lora_grads
    from megalora.train.lora.layout import lora_layout
    from megalora.train.model.build import build_model
    from megalora.train.step import train_step

    cfg, _ = load_config(None, ["--lora_rank", "4", "--target_modules", "all-linear", "output_layer",
                                "--lora_dtype", "float64"])
    dims = groups.initialize(device="cpu")
    try:
        model, info = build_model(train_assets.model_dir, dtype=torch.float64)
        apply_lora(model, cfg.lora, seed=3, verbose=False)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        layout = lora_layout(model)
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        rng = np.random.default_rng(0)
        ids_a, ids_b = rng.integers(5, 1000, 70), rng.integers(5, 1000, 40)
        lab_a = np.full(70, -100)
        lab_a[-4:] = ids_a[-4:]  # 4 trained tokens
        lab_b = ids_b.copy()
        lab_b[0] = -100  # the first token of a sample is never a target: 39 trained tokens
        samples = [(ids_a, lab_a), (ids_b, lab_b)]
        one = [_batch(samples, 0)]
        two = [_batch([samples[0]], 0), _batch([samples[1]], 0)]
        counts = [int(b["num_trained_tokens"]) for b in two]
        assert counts == [4, 39]
        kw = dict(dims=dims, packed=False, layout=layout, params=params, clip_grad=0.0, reduce_grads=reduce_lora_grads)
        big = train_step(model, one, **kw)
        grads_big = [p.grad.clone() for p in params]
        acc = train_step(model, two, **kw)
        assert acc.loss == pytest.approx(big.loss, rel=1e-12)
        assert acc.trained_tokens == big.trained_tokens == sum(counts)
        # Some internals stay float32 (rotary tables, router probabilities), and the two runs pad
        # differently, so agreement is to float32 rounding rather than float64's.
        for g_big, p in zip(grads_big, params):
            err = (p.grad - g_big).norm() / g_big.norm().clamp_min(1e-30)
            assert err <= 1e-6, float(err)
        assert sum(float(g.abs().sum()) for g in grads_big) > 0
    finally:
        groups.destroy()
