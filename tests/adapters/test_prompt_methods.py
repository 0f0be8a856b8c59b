"""Prefix tuning, prompt tuning and P-tuning on tiny models of every family: exact parameter counts, training
touches only their parameters, save/load bit-exact, packed == padded, batched cached generation == unbatched ==
a from-scratch greedy reference (a pre-filled KV cache / prepended embeddings on the plain base model), the
step-0 statement of a text-initialised prompt, refusals, and one 2-rank ZeRO-3 run of each method."""

from __future__ import annotations

import json

import pytest
import torch
from launch import losses, run, write_train_assets
from safetensors.torch import load_file
from tiny_models import FAMILIES, HEADS, KV_HEADS, LAYERS, H, make_model, sample_batch
from tiny_tokenizer import make_tokenizer
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from adapters_ds import (
    InputError,
    adapter_layers,
    adapter_parameters,
    config_from_dict,
    count_parameters,
    freeze_base,
    get_method,
    inject_adapters,
    load_adapter,
    load_base_model,
    read_adapter_config,
    remove_adapters,
    save_adapter,
)
from adapters_ds.adapters.prefix import PrefixConfig
from adapters_ds.adapters.prompt import PromptConfig
from adapters_ds.adapters.ptuning import PTuningConfig
from adapters_ds.adapters.registry import METHODS
from adapters_ds.adapters.storage import WEIGHTS_NAME
from adapters_ds.evaluation.generation import generate_ids
from adapters_ds.evaluation.harness import load_model
from adapters_ds.training.args import adapter_config, parse_train_args
from adapters_ds.training.data import collate, collate_packed
from adapters_ds.training.loss import causal_lm_loss_sum, loss_sum
from adapters_ds.training.packing import enable_packing, supports_packing

N, ENC = 4, 8  # virtual tokens, encoder width
CASES = {
    "prefix": lambda: PrefixConfig(num_virtual_tokens=N),
    "prefix_projection": lambda: PrefixConfig(num_virtual_tokens=N, projection=True, encoder_hidden_size=ENC),
    "prompt": lambda: PromptConfig(num_virtual_tokens=N),
    "ptuning_mlp": lambda: PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=ENC),
    "ptuning_lstm": lambda: PTuningConfig(num_virtual_tokens=N, encoder_type="lstm", encoder_hidden_size=ENC),
}
PREFIX_FAMILIES = tuple(f for f in FAMILIES if f != "bloom")  # BLOOM's ALiBi attention is refused
GRID = [(f, c) for c in CASES for f in (PREFIX_FAMILIES if c.startswith("prefix") else FAMILIES)]


def is_prefix(case: str) -> bool:
    return case.startswith("prefix")


def adapted(family: str, case: str, dtype=torch.float32):
    model = make_model(family, dtype)
    config = CASES[case]()
    inject_adapters(model, config)
    freeze_base(model)
    return model, config


def the_adapter(model):
    ((_, _, adapter),) = adapter_layers(model)
    return adapter


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def real_logits(model, batch, case: str) -> torch.Tensor:
    """Logits of the real positions (prompt methods' logits also cover the virtual ones, in front)."""
    out = logits_of(model, batch)
    return out if is_prefix(case) else out[:, N:]


def padded_batch() -> dict[str, torch.Tensor]:
    batch = sample_batch(2, 7)
    batch["attention_mask"][1, :2] = 0  # left padding in row 1
    return batch


def features(seed: int = 0) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length in (5, 9, 3, 7):
        ids = torch.randint(3, 512, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    return out


# ---- counts -----------------------------------------------------------------------------------------------------


def expected_trainable(family: str, case: str, hidden=H, layers=LAYERS, kv_heads=None, head_dim=None, n=N, h=ENC):
    """Trainable parameters from the methods' definitions (PEFT's shapes)."""
    kv_heads = kv_heads or (KV_HEADS if family in ("llama", "mistral", "qwen2") else HEADS)
    kv_width = 2 * kv_heads * (head_dim or hidden // HEADS)  # one layer's [K | V]
    mlp = lambda i, o: i * o + o  # noqa: E731  (weight + bias)
    lstm_layer = lambda i: 2 * (4 * h * i + 4 * h * h + 8 * h)  # noqa: E731  (both directions, two biases each)
    return {
        "prefix": layers * n * kv_width,
        "prefix_projection": n * hidden + mlp(hidden, h) + layers * mlp(h, kv_width),
        "prompt": n * hidden,
        "ptuning_mlp": n * hidden + mlp(hidden, h) + mlp(h, h) + mlp(h, hidden),
        "ptuning_lstm": n * hidden + lstm_layer(hidden) + lstm_layer(2 * h) + mlp(2 * h, 2 * h) + mlp(2 * h, hidden),
    }[case]


@pytest.mark.parametrize("family,case", GRID)
def test_trainable_parameter_counts(family, case):
    model, _ = adapted(family, case)
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in adapter_parameters(model).values())
    assert trainable == expected_trainable(family, case)
    assert total - trainable == sum(p.numel() for p in make_model(family).parameters())


@pytest.mark.parametrize(
    "case,expected",
    [  # LLaMA-7B shapes (hidden 4096, 32 layers, 32 heads of 128), the defaults: 30 virtual tokens, encoder 128
        ("prefix", 7_864_320),
        ("prefix_projection", 34_463_872),
        ("prompt", 122_880),
        ("ptuning_mlp", 1_192_192),
        ("ptuning_lstm", 5_964_032),
    ],
)
def test_llama7b_counts_on_meta_device(case, expected):
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    method = {"prefix_projection": "prefix", "ptuning_mlp": "ptuning", "ptuning_lstm": "ptuning"}.get(case, case)
    options = {"prefix_projection": {"projection": True}, "ptuning_lstm": {"encoder_type": "lstm"}}.get(case, {})
    inject_adapters(model, config_from_dict({"method": method, **options}))
    assert sum(p.numel() for p in adapter_parameters(model).values()) == expected
    formula = expected_trainable("llama", case, hidden=4096, layers=32, kv_heads=32, head_dim=128, n=30, h=128)
    assert formula == expected


# ---- training, saving, removal -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family,case", GRID)
def test_one_step_changes_every_adapter_tensor_and_nothing_else(family, case):
    model, _ = adapted(family, case)
    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in adapter_parameters(model)}
    before = {k: v.detach().clone() for k, v in adapter_parameters(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    causal_lm_loss_sum(model, collate(features(), 0)).backward()
    optimizer.step()
    for name, value in adapter_parameters(model).items():
        assert not torch.equal(value, before[name]), name
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


@pytest.mark.parametrize("family,case", GRID)
def test_save_load_round_trip_is_exact(tmp_path, family, case):
    model, config = adapted(family, case, torch.bfloat16)
    save_adapter(model, config, tmp_path / "adapter")
    fresh = make_model(family, torch.bfloat16)
    assert load_adapter(fresh, tmp_path / "adapter") == config
    saved, loaded = adapter_parameters(model), adapter_parameters(fresh)
    assert saved.keys() == loaded.keys()
    assert all(loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], saved[k]) for k in saved)
    batch = padded_batch()
    assert torch.equal(real_logits(fresh, batch, case), real_logits(model, batch, case))


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_changes_outputs_and_removal_restores_the_base(case):
    base = make_model("llama")
    model, _ = adapted("llama", case)
    batch = padded_batch()
    assert not torch.allclose(real_logits(model, batch, case), logits_of(base, batch), atol=1e-3)
    remove_adapters(model)
    assert torch.equal(logits_of(model, batch), logits_of(base, batch))
    assert model.config._attn_implementation == base.config._attn_implementation


@pytest.mark.parametrize("case", list(CASES))
def test_explicit_positions_mean_what_default_positions_mean(case):
    """position_ids 0..T-1 given explicitly give the logits of the call without them (for both, real tokens sit
    after the virtual ones)."""
    model, _ = adapted("llama", case)
    batch = sample_batch(2, 7)
    positions = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        assert torch.equal(model(**batch, position_ids=positions).logits, model(**batch).logits)


@pytest.mark.parametrize("case", list(CASES))
def test_labels_give_the_mean_loss_of_the_real_tokens(case):
    """transformers' own loss (`model(labels=...)`) sees -100 at the virtual positions: the mean over the real
    targets, as our summed loss counts them."""
    model, _ = adapted("gpt2", case)
    batch = collate(features(), 0)  # the first label of every example is -100: no virtual token predicts a target
    with torch.no_grad():
        mean = model(**batch).loss
        summed = causal_lm_loss_sum(model, batch)
    assert mean.item() == pytest.approx(summed.item() / (batch["labels"][:, 1:] != -100).sum().item(), rel=1e-5)


# ---- packing and padding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,case", [(f, c) for f, c in GRID if f in ("llama", "gpt2", "gpt_neox", "gptj")])
def test_packed_row_gives_the_padded_batch_loss_and_gradients(family, case):
    """Each packed example sees the virtual tokens / the prefix and only its own tokens: loss and gradients equal
    those of the right-padded batch, and the padded loss equals the loss on the full logits."""
    model = make_model(family)
    assert supports_packing(model) and enable_packing(model)
    inject_adapters(model, CASES[case]())
    freeze_base(model)
    padded, packed = collate(features(), 0), collate_packed(features())
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = causal_lm_loss_sum(model, batch)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in adapter_parameters(model).items()}))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        full = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    shift = 0 if is_prefix(case) else N
    assert loss_sum(full[:, shift:], padded["labels"]).item() == pytest.approx(padded_loss.item(), rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_row_with_boundaries_given_as_the_trainer_passes_them(family, case):
    """The trainer passes a packed row's boundaries with the batch (host numbers and transformers' varlen kwargs,
    with an all-True attention mask) for the packed attention kernels: the virtual tokens move them, the prefix
    uses them; the loss stays the padded batch's."""
    attention = pytest.importorskip("adapters_ds.training.attention")
    model = make_model(family)
    enable_packing(model)
    implementation = model.config._attn_implementation
    inject_adapters(model, CASES[case]())
    padded, packed = collate(features(), 0), collate_packed(features())
    packed.update(attention.packed_inputs(implementation, [len(f["input_ids"]) for f in features()]))
    assert "packed_bounds" in packed and packed["attention_mask"].all()
    with torch.no_grad():
        expected, found = causal_lm_loss_sum(model, padded), causal_lm_loss_sum(model, packed)
    assert found.item() == pytest.approx(expected.item(), rel=1e-6)


# ---- generation ----------------------------------------------------------------------------------------------------


def prefix_cache(prompt_embeddings: torch.Tensor, kv_heads: int, head_dim: int) -> DynamicCache:
    """PEFT's prefix layout turned into a pre-filled cache, written from scratch: last dimension [L0.K | L0.V | L1.K
    | ...], each block (kv_heads, head_dim) row-major; keys without rotary embedding."""
    n = prompt_embeddings.shape[0]
    x = prompt_embeddings.view(n, -1, 2, kv_heads, head_dim)
    return DynamicCache(
        [(x[:, layer, 0].transpose(0, 1)[None], x[:, layer, 1].transpose(0, 1)[None]) for layer in range(x.shape[1])]
    )


@torch.no_grad()
def reference_greedy(base, case: str, prompt_embeddings: torch.Tensor, ids: list[int], steps: int, eos: int):
    """Greedy decoding on the plain base model (no adapters_ds code): the prefix as a pre-filled cache, or the
    soft prompt as embeddings in front of the prompt's."""
    x = torch.tensor([ids])
    mask = torch.ones(1, N + len(ids), dtype=torch.long)
    if is_prefix(case):
        kv_heads = KV_HEADS if base.config.model_type in ("llama", "mistral", "qwen2") else HEADS
        out = base(input_ids=x, attention_mask=mask, cache=prefix_cache(prompt_embeddings, kv_heads, H // HEADS))
    else:
        embeds = torch.cat([prompt_embeddings[None], base.get_input_embeddings()(x)], dim=1)
        out = base(inputs_embeds=embeds, attention_mask=mask, cache=DynamicCache(), use_cache=True)
    new = []
    for _ in range(steps):
        token = int(out.logits[0, -1].argmax())
        if token == eos:
            break
        new.append(token)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        out = base(input_ids=torch.tensor([[token]]), attention_mask=mask, cache=out.cache, use_cache=True)
    return new


@pytest.mark.parametrize("family,case", [(f, c) for f, c in GRID if f in ("llama", "gpt2", "opt", "bloom")])
def test_batched_generation_equals_unbatched_and_the_reference(family, case):
    """The evaluation harness's generation (KV cache, left padding, length-sorted batches) with the adapter: each
    row as generated alone, and as a greedy loop on the plain base model with the prefix / soft prompt put in by
    hand; and different from the base model's (the adapter is not silently dropped during generation)."""
    model, _ = adapted(family, case)
    tokenizer = make_tokenizer()
    prompts = [f["input_ids"] for f in features(seed=4)]
    batched = generate_ids(model, tokenizer, prompts, 6, stop_strings=())
    alone = [generate_ids(model, tokenizer, [p], 6, stop_strings=())[0] for p in prompts]
    assert batched == alone
    embeddings = the_adapter(model).peft_embeddings()
    base = make_model(family)
    reference = [reference_greedy(base, case, embeddings, p, 6, tokenizer.eos_token_id) for p in prompts]
    assert batched == reference
    ids = torch.tensor([prompts[0]])
    steps = [
        torch.stack(m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                               pad_token_id=0, output_logits=True, return_dict_in_generate=True).logits)
        for m in (model, base)
    ]  # fmt: skip
    for ours, plain in zip(*steps, strict=True):  # every decoding step's logits
        assert not torch.allclose(ours, plain, atol=1e-4)


# ---- initialisation from a text ------------------------------------------------------------------------------------


def saved_base(tmp_path, family: str = "llama") -> str:
    make_model(family).save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


REAL_TOKEN_CONFIGS = {"prompt": PromptConfig, "prefix": PrefixConfig, "ptuning": PTuningConfig}


@pytest.mark.parametrize("method,text", [("prompt", "is 42"), ("prefix", "Let us think step by step"),
                                         ("ptuning", "is 42"), ("prompt", None), ("prefix", None),
                                         ("ptuning", None)])  # fmt: skip
def test_real_token_init_starts_as_the_base_model_reading_those_tokens(tmp_path, method, text):
    """Prompt tuning from the tokens' embeddings, prefix tuning from their keys and values, P-tuning's residual
    encoder from their embeddings (its last layer zero): either way the adapted model's logits equal the base
    model's reading the tokens first (a text repeated or cut to N tokens; without a text, N tokens sampled from the
    vocabulary, special tokens left out)."""
    path = saved_base(tmp_path)
    model = load_base_model(path, dtype="float32")
    unresolved = REAL_TOKEN_CONFIGS[method](num_virtual_tokens=N, init_text=text)
    config = unresolved.resolve(make_tokenizer())  # a new config: the tokens are resolved outside injection
    assert unresolved.init_token_ids is None
    inject_adapters(model, config)
    if text is not None:
        ids = make_tokenizer()(text, add_special_tokens=False)["input_ids"]
        assert len(ids) != N  # the text is repeated, or cut, to N tokens
        assert config.init_token_ids == tuple((ids * N)[:N])
    else:
        assert len(config.init_token_ids) == N
        assert not set(config.init_token_ids) & set(make_tokenizer().all_special_ids)
    batch = sample_batch(2, 7)
    prompt = torch.tensor(config.init_token_ids).expand(2, N)
    base = load_base_model(path, dtype="float32")
    with torch.no_grad():
        expected = base(input_ids=torch.cat([prompt, batch["input_ids"]], 1)).logits
        found = model(**batch).logits
        found = found if method == "prefix" else found[:, N:]
        torch.testing.assert_close(found, expected[:, N:], rtol=1e-5, atol=1e-5)
    # the ids are kept in the config: a saved adapter loads without a tokenizer
    save_adapter(model, config, tmp_path / "adapter")
    fresh = make_model("llama")
    assert load_adapter(fresh, tmp_path / "adapter").init_token_ids == config.init_token_ids


def test_ptuning_random_init_is_pefts_encoder_and_old_configs_keep_it():
    """`--ptuning_init random` is PEFT's form, P = encoder(E); a saved config without `init` (written before the
    residual form) loads as that form, so its P is what it was; the default is residual."""
    assert PTuningConfig().residual and PTuningConfig(init_text="x").residual
    old = {k: v for k, v in PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=ENC).to_dict().items()}
    del old["init"]
    loaded = config_from_dict(old)
    assert loaded.init == "random" and not loaded.residual
    model = make_model("llama")
    inject_adapters(model, loaded)
    layer = the_adapter(model)
    with torch.no_grad():
        torch.testing.assert_close(layer(), layer.mlp(layer.embedding), rtol=0, atol=0)
        assert layer.mlp[-1].weight.abs().sum() > 0  # PEFT's initialisation, not the residual form's zero


def test_prompt_from_text_needs_the_tokenizer():
    with pytest.raises(InputError, match="--prompt_init_text needs the base model's tokenizer"):
        inject_adapters(make_model("llama"), PromptConfig(init_text="hello"))


# ---- refusals and options ------------------------------------------------------------------------------------------


def test_prefix_on_bloom_is_refused_naming_method_and_family():
    model = make_model("bloom")
    with pytest.raises(InputError, match="prefix tuning cannot be applied to bloom models: its ALiBi"):
        inject_adapters(model, PrefixConfig())
    assert not list(adapter_layers(model))


@pytest.mark.parametrize(
    "values,message",
    [
        ({"method": "prefix", "target_modules": ["q_proj"]}, "prefix adapts the whole model"),
        ({"method": "prompt", "num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
        ({"method": "ptuning", "encoder_type": "gru"}, "encoder_type must be 'mlp' or 'lstm'"),
        ({"method": "ptuning", "encoder_hidden_size": 0}, "encoder_hidden_size must be a positive integer"),
        ({"method": "prefix", "projection": "yes"}, "projection must be true or false"),
        ({"method": "prompt", "init_text": "  "}, "init_text must be a non-empty text"),
        ({"method": "prompt", "init": "random", "init_token_ids": [5]}, "tokens of init_text or sampled"),
        ({"method": "prefix", "init": "zeros"}, "init must be 'vocab' or 'random'"),
        # an option of the other prefix mode is refused, not ignored
        ({"method": "prefix", "projection": True, "init_text": "Solve:"}, "--prefix_init_text does not apply with"),
        ({"method": "prefix", "encoder_hidden_size": 64}, "--encoder_hidden_size 64 applies to prefix tuning only"),
    ],
)
def test_config_validation(values, message):
    with pytest.raises(InputError, match=message):
        config_from_dict(values)


@pytest.mark.parametrize("case", list(CASES))
def test_config_round_trip(case):
    config = CASES[case]()
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_at_its_own_learning_rate_unless_one_is_given(method):
    args = parse_train_args(["--ds_config", "x.json", "--adapter", method])
    assert args.learning_rate == get_method(method).config.default_learning_rate > 0
    given = parse_train_args(["--ds_config", "x.json", "--adapter", method, "--learning_rate", "0.123"])
    assert given.learning_rate == 0.123


def test_command_line_options_are_shared_with_one_default():
    args = parse_train_args(["--ds_config", "x.json", "--adapter", "prefix", "--prefix_projection"])
    assert adapter_config(args) == PrefixConfig(num_virtual_tokens=30, projection=True, encoder_hidden_size=128)
    args = parse_train_args(["--ds_config", "x.json", "--adapter", "ptuning", "--num_virtual_tokens", "8"])
    assert adapter_config(args) == PTuningConfig(num_virtual_tokens=8, encoder_hidden_size=128)
    args = parse_train_args(["--ds_config", "x.json", "--adapter", "prompt", "--prompt_init_text", "Solve:"])
    assert adapter_config(args) == PromptConfig(num_virtual_tokens=30, init_text="Solve:")


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_base_gives_bf16_adapter_that_runs(case):
    model, _ = adapted("llama", case, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in adapter_parameters(model).values())
    assert torch.isfinite(real_logits(model, padded_batch(), case).float()).all()


# ---- real 2-rank ZeRO-3 runs -----------------------------------------------------------------------------------------

ZERO3_RUNS = {
    "prefix": ["--prefix_projection", "--encoder_hidden_size", "16"],
    "prompt": ["--prompt_init_text", "What is the sum"],
    "ptuning": ["--encoder_type", "lstm", "--encoder_hidden_size", "16"],
}


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    """The training assets and a cache of finished runs (method -> output folder): 2 ranks, the shipped ZeRO-3
    config (bf16 where the CPU has it), packed rows, 10 steps with checkpoints every 3."""
    assets = write_train_assets(tmp_path_factory.mktemp("zero3"))
    done: dict[str, object] = {}

    def train(method: str, out, *extra: str) -> None:
        run([
            "--base_model", str(assets / "base"), "--data_path", str(assets / "data.json"), "--output_dir", str(out),
            "--ds_config", "ds_configs/zero3.json", "--cutoff_len", "48", "--micro_batch_size", "4",
            "--batch_size", "8", "--logging_steps", "1", "--lr_scheduler", "constant", "--learning_rate", "3e-1",
            "--save_steps", "3", "--num_virtual_tokens", "8", "--seed", "7",
            "--adapter", method, *ZERO3_RUNS[method], *extra,
        ])  # fmt: skip

    def straight(method: str):
        if method not in done:
            done[method] = assets / method
            train(method, done[method], "--max_steps", "10")
        return done[method]

    return assets, train, straight


@pytest.mark.slow
@pytest.mark.parametrize("method", list(ZERO3_RUNS))
def test_zero3_two_ranks_trains_replicated_and_the_harness_loads_it(zero3, method):
    """The loss falls, the adapter stays whole on every rank, and the evaluation harness loads the result and
    generates with it."""
    assets, _, straight = zero3
    out = straight(method)
    steps = losses(out)
    assert len(steps) == 10 and sum(steps[-2:]) < sum(steps[:2])
    config, _ = read_adapter_config(out / "adapter")
    case = {"prefix": "prefix_projection", "ptuning": "ptuning_lstm"}.get(method, method)
    expected = expected_trainable("llama", case, n=8, h=16)
    for rank in json.loads((out / "zero3_partition.json").read_text()):
        assert rank["adapter_local_numel"] == rank["adapter_numel"] == expected
    cpu = torch.device("cpu")
    model, tokenizer, loaded = load_model(str(assets / "base"), str(out / "adapter"), torch.float32, cpu)
    assert loaded == config.method == method and isinstance(the_adapter(model), get_method(method).layer)
    generated = generate_ids(model, tokenizer, [tokenizer("What is 2 plus 3?")["input_ids"]], 4, stop_strings=())
    assert len(generated) == 1


@pytest.mark.slow
def test_zero3_resume_continues_exactly(zero3):
    """Prefix tuning (with its projection MLP) stopped at step 3 and resumed: the losses and the adapter of the
    uninterrupted run."""
    assets, train, straight = zero3
    reference = straight("prefix")
    out = assets / "prefix_resumed"
    train("prefix", out, "--max_steps", "3")
    train("prefix", out, "--max_steps", "10", "--resume", "auto")
    assert losses(out) == pytest.approx(losses(reference), abs=1e-6)
    resumed, expected = load_file(out / "adapter" / WEIGHTS_NAME), load_file(reference / "adapter" / WEIGHTS_NAME)
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name].float(), expected[name].float(), atol=1e-6, rtol=0)
