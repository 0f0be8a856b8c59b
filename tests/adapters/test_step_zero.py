"""What every registered method does to the model at step 0, as the README's adapter section states it: the methods
it names as the identity leave the logits exactly the base model's; the others change every position's output: prompt
and prefix tuning (real-token initialisation, their default) make it the base model's reading those tokens before the
input, P-tuning the base model's reading its encoder's output there. Each method at its default options on the tiny
LLaMA (fp32)."""

from __future__ import annotations

import re

import torch
from launch import REPO
from tiny_models import make_model, sample_batch
from tiny_tokenizer import make_tokenizer

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


def adapted(method: str) -> tuple[torch.nn.Module, object]:
    model = make_model("llama")
    config = get_method(method).config().resolve(make_tokenizer())  # prompt/prefix: their real tokens
    inject_adapters(model, config)
    freeze_base(model)
    return model.eval(), config


def test_every_method_at_step_zero_does_what_the_readme_says():
    identity, not_identity = readme_step_zero()
    assert identity | not_identity == set(adapters_ds.METHODS) and not identity & not_identity
    batch = sample_batch()
    ids, seq = batch["input_ids"], batch["input_ids"].shape[1]
    base = make_model("llama").eval()
    with torch.no_grad():
        expected = base(**batch).logits
        for method in sorted(identity):
            assert torch.equal(adapted(method)[0](**batch).logits, expected), method
        for method in sorted(not_identity):
            model, config = adapted(method)
            got = model(**batch).logits
            assert (got[:, -seq:] - expected).abs().amax(dim=-1).min() > 1e-4, f"{method} left a position unchanged"
            tokens = getattr(config, "init_token_ids", None)
            if tokens:  # real tokens (prompt, prefix): the base model reading them before the input
                read = torch.cat([torch.tensor(tokens).expand(ids.shape[0], -1), ids], dim=1)
                reference = base(input_ids=read, attention_mask=torch.ones_like(read)).logits
                torch.testing.assert_close(got[:, -seq:], reference[:, -seq:], msg=method)
            else:  # P-tuning: the base model reading P, its encoder's output, before the input
                (layer,) = [adapter for _, _, adapter in adapter_layers(model)]
                assert isinstance(layer, VirtualTokens), method
                prompt = layer().expand(ids.shape[0], -1, -1)  # (batch, n, hidden)
                embeds = torch.cat([prompt, base.get_input_embeddings()(ids)], dim=1)
                mask = torch.ones(embeds.shape[:2], dtype=batch["attention_mask"].dtype)
                torch.testing.assert_close(got, base(inputs_embeds=embeds, attention_mask=mask).logits, msg=method)
