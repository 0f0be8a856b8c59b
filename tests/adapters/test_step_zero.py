"""What every registered method does to the model at step 0, as the README's adapter section states it: the methods
it names as the identity leave the logits exactly the base model's; prompt tuning and P-tuning make the model the
base model reading their virtual tokens in front of each input; prefix tuning changes the output from the first
step. Each method at its default options on the tiny LLaMA (fp32)."""

from __future__ import annotations

import re

import torch
from launch import REPO
from tiny_models import make_model, sample_batch

import adapters_ds
from adapters_ds import adapter_layers, freeze_base, get_method, inject_adapters
from adapters_ds.adapters.virtual_tokens import VirtualTokens


def readme_step_zero() -> tuple[set[str], set[str]]:
    """The methods the README names as the identity at step 0, and those it names as not."""
    text = " ".join((REPO / "README.md").read_text().split())
    identity = re.search(r"At step 0,? (.*?) are the identity", text)
    not_identity = re.search(r"are the identity[^.]*\. (.*?) are not\b", text)
    assert identity and not_identity, "the README's sentence on step 0 is missing"
    names = lambda found: set(re.findall(r"`(\w+)`", found.group(1)))  # noqa: E731
    return names(identity), names(not_identity)


def adapted(method: str) -> torch.nn.Module:
    model = make_model("llama")
    inject_adapters(model, get_method(method).config())
    freeze_base(model)
    return model.eval()


def test_every_method_at_step_zero_does_what_the_readme_says():
    identity, not_identity = readme_step_zero()
    assert identity | not_identity == set(adapters_ds.METHODS) and not identity & not_identity
    batch = sample_batch()
    base = make_model("llama").eval()
    with torch.no_grad():
        expected = base(**batch).logits
        for method in sorted(identity):
            assert torch.equal(adapted(method)(**batch).logits, expected), method
        for method in sorted(not_identity):
            model = adapted(method)
            got = model(**batch).logits
            layers = [adapter for _, _, adapter in adapter_layers(model)]
            if isinstance(layers[0], VirtualTokens):  # the base model reading P, the virtual tokens, before the input
                (layer,) = layers
                prompt = layer().expand(batch["input_ids"].shape[0], -1, -1)  # (batch, n, hidden)
                embeds = torch.cat([prompt, base.get_input_embeddings()(batch["input_ids"])], dim=1)
                mask = torch.ones(embeds.shape[:2], dtype=batch["attention_mask"].dtype)
                torch.testing.assert_close(got, base(inputs_embeds=embeds, attention_mask=mask).logits)
            else:  # prefix: the same shape, other numbers at every position
                assert got.shape == expected.shape
                assert (got - expected).abs().amax(dim=-1).min() > 1e-4, method
