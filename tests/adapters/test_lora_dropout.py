"""LoRA's training path: the shared, cheap dropout (rate, expectation, one mask per input tensor) and the training
order of operations (the scale on the rank-r intermediate), whose per-step losses equal PEFT's order."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import make_model, sample_batch

from adapters_ds import LoRAConfig, adapter_layers, freeze_base, inject_adapters
from adapters_ds.adapters.dropout import LEVELS, SharedDropout, keep_threshold

N = 1_000_000


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_rate_and_expectation(p):
    torch.manual_seed(0)
    dropout = SharedDropout(p).train()
    dropped, scale = dropout(torch.ones(1000, N // 1000))
    q = keep_threshold(p) / LEVELS
    assert abs(q - (1 - p)) <= 2**-17
    assert scale * q == pytest.approx(1.0, abs=1e-12)  # E[dropped · scale] = input
    assert set(dropped.unique().tolist()) <= {0.0, 1.0}
    kept = dropped.mean().item()
    assert abs(kept - q) < 5 * math.sqrt(q * (1 - q) / N)
    # a second tensor gets a mask of its own: independent elements agree with probability q² + (1 - q)²
    other, _ = dropout(torch.ones(1000, N // 1000))
    agree, expected = (other == dropped).float().mean().item(), q * q + (1 - q) * (1 - q)
    assert abs(agree - expected) < 5 * math.sqrt(expected * (1 - expected) / N)


def test_one_mask_per_input_tensor():
    first, second = SharedDropout(0.5).train(), SharedDropout(0.5).train()
    x = torch.randn(64, 32, requires_grad=True)
    dropped, _ = first(x)
    assert second(x)[0] is dropped  # q, k and v read the same tensor
    assert second(x.detach())[0] is dropped  # ZeRO-3 hands each module a detached alias of it
    assert not torch.equal(first(x.clone())[0], dropped)  # another tensor (same values): a mask of its own
    again, _ = first(x)  # the clone came in between: x gets a new mask
    assert again is not dropped
    with torch.no_grad():
        assert first(x)[0] is not again  # no graph under no_grad: not reused where a gradient is needed
    y = x.detach().clone()
    before, _ = first(y)
    y.add_(1.0)  # written in place: the old mask's product is stale
    assert first(y)[0] is not before
    for dropout in (first.eval(), SharedDropout(0.0).train()):
        out, scale = dropout(x)
        assert out is x and scale == 1.0


def test_update_expectation_equals_the_undropped_update():
    """E over masks of the LoRA branch with dropout = the branch without it (each draw on a new tensor)."""
    torch.manual_seed(0)
    model = make_model("llama")
    inject_adapters(model, LoRAConfig(r=4, alpha=8, dropout=0.3, target_modules=["q_proj"]))
    _, base, adapter = next(adapter_layers(model))
    torch.nn.init.normal_(adapter.lora_B)
    x = torch.randn(8, base.in_features)
    adapter.eval()
    exact = adapter(x, base(x))
    adapter.train()
    draws = 1000
    mean = sum(adapter(x.clone(), None) for _ in range(draws)) / draws
    spread = torch.stack([adapter(x.clone(), None) for _ in range(100)]).std(0)
    assert ((mean - exact).abs() < 5 * spread / math.sqrt(draws) + 1e-6).all()


def test_adapters_sharing_an_input_share_the_mask():
    model = make_model("llama")
    inject_adapters(model, LoRAConfig(r=4, alpha=8, dropout=0.1))
    model.train()
    outputs: dict[str, int] = {}
    for name, _, adapter in adapter_layers(model):
        adapter.dropout.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, id(o[0])))
    model(**sample_batch())
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        ids = {n.removeprefix(prefix): v for n, v in outputs.items() if n.startswith(prefix)}
        qkv = {ids[f"self_attn.{k}_proj"] for k in "qkv"}
        assert len(qkv) == 1 and len(set(ids.values())) == 3  # q/k/v one, up one, down one


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("options", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"])
def test_training_order_gives_the_losses_of_peft_order(dtype, rel, options):
    """Per-step losses of 4 AdamW steps: adapters in training mode (scale on the rank-r intermediate) against the
    same adapters in eval mode (PEFT's order, as training computed it before), without dropout."""
    batch = sample_batch()
    runs = []
    for training in (True, False):
        torch.manual_seed(0)
        model = make_model("llama", dtype)
        config = LoRAConfig(r=4, alpha=6, dropout=0.0, **options)
        inject_adapters(model, config)
        freeze_base(model)
        model.train()
        for _, _, adapter in adapter_layers(model):
            adapter.train(training)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        losses = []
        for _ in range(4):
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs.append(losses)
    assert runs[0][-1] < runs[0][0]  # it trains
    assert runs[0] == pytest.approx(runs[1], rel=rel)
