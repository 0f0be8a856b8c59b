"""Tiny models of every supported family, built from configs (no download), and their layer shapes.

Hidden 32, intermediate 48, 4 heads, 2 KV heads where the family has grouped-query attention: in, out and
KV sizes all differ, so a transposed or swapped dimension cannot pass a test by accident.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BloomConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

VOCAB = 512  # tiny_tokenizer.VOCAB_SIZE: models and the test tokenizer agree
H, INTER, HEADS, KV_HEADS, LAYERS = 32, 48, 4, 2, 2
KV = H // HEADS * KV_HEADS  # key/value projection width under grouped-query attention

_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA_LIKE = dict(
    **_IDS,
    vocab_size=VOCAB,
    hidden_size=H,
    intermediate_size=INTER,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=64,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: MistralConfig(**_LLAMA_LIKE),
    "qwen2": lambda: Qwen2Config(**_LLAMA_LIKE),
    "gpt_neox": lambda: GPTNeoXConfig(
        **_IDS,
        vocab_size=VOCAB,
        hidden_size=H,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
    ),
    "bloom": lambda: BloomConfig(**_IDS, vocab_size=VOCAB, hidden_size=H, n_layer=LAYERS, n_head=HEADS),
    "gptj": lambda: GPTJConfig(
        **_IDS, vocab_size=VOCAB, n_embd=H, n_inner=INTER, n_layer=LAYERS, n_head=HEADS, rotary_dim=4
    ),
    "opt": lambda: OPTConfig(
        **_IDS,
        vocab_size=VOCAB,
        hidden_size=H,
        ffn_dim=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        word_embed_proj_dim=H,
        max_position_embeddings=64,
    ),
    "gpt2": lambda: GPT2Config(
        **_IDS, vocab_size=VOCAB, n_embd=H, n_inner=INTER, n_layer=LAYERS, n_head=HEADS, n_positions=64
    ),
}
FAMILIES = tuple(CONFIGS)

# (in, out) of every default target per layer, written from the architectures, not read from the modules.


def _mlp_in(family: str) -> int:
    return 4 * H if family == "bloom" else INTER  # BLOOM's MLP width is fixed at 4 × hidden


def target_shapes(family: str, key: str) -> list[tuple[int, int]]:
    """Per-layer (in, out) shapes of the default targets for `key` (lora, series_pfeiffer, ...)."""
    m = _mlp_in(family)
    up, down, attn_out = (H, m), (m, H), (H, H)
    if family in ("llama", "mistral", "qwen2"):
        qkv = [(H, H), (H, KV), (H, KV)]
    elif family in ("gptj", "opt"):
        qkv = [(H, H), (H, H), (H, H)]
    else:  # fused query_key_value / c_attn
        qkv = [(H, 3 * H)]
    return {
        "lora": [*qkv, up, down],
        "series_pfeiffer": [down],
        "series_houlsby": [attn_out, down],
        "parallel": [up, down],
    }[key]


def make_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=dtype)
    return model.eval()


def sample_batch(batch: int = 2, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# The families of today's fine-tuning, built with `AutoConfig.for_model` (their own config classes): dense ones in
# LLaMA's shapes, Phi-3 with its fused qkv_proj / gate_up_proj, Llama 3.x with its RoPE scaling, Gemma with a
# sliding window shorter than the test sequences, and three mixtures of 4 experts (2 per token).
EXPERTS, TOP_K, EXPERT_INTER = 4, 2, 16
_SLIDING = dict(sliding_window=4, head_dim=H // HEADS, query_pre_attn_scalar=H // HEADS)
_MOE = dict(num_experts_per_tok=TOP_K, moe_intermediate_size=EXPERT_INTER, intermediate_size=EXPERT_INTER)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
RECENT_CONFIGS = {
    "llama3": lambda: AutoConfig.for_model("llama", **_LLAMA_LIKE, rope_parameters=_LLAMA3_ROPE),
    "qwen3": lambda: AutoConfig.for_model("qwen3", **_LLAMA_LIKE, head_dim=H // HEADS),
    "gemma2": lambda: AutoConfig.for_model("gemma2", **_LLAMA_LIKE, **_SLIDING),
    "gemma3_text": lambda: AutoConfig.for_model("gemma3_text", **_LLAMA_LIKE, **_SLIDING),
    "phi3": lambda: AutoConfig.for_model("phi3", **_LLAMA_LIKE),
    "olmo2": lambda: AutoConfig.for_model("olmo2", **_LLAMA_LIKE),
    "granite": lambda: AutoConfig.for_model("granite", **_LLAMA_LIKE, embedding_multiplier=2.0, logits_scaling=2.0),
    "mixtral": lambda: AutoConfig.for_model("mixtral", **{**_LLAMA_LIKE, **_MOE}, num_local_experts=EXPERTS),
    "qwen3_moe": lambda: AutoConfig.for_model(
        "qwen3_moe", **{**_LLAMA_LIKE, **_MOE}, num_experts=EXPERTS, head_dim=H // HEADS
    ),
    "olmoe": lambda: AutoConfig.for_model("olmoe", **{**_LLAMA_LIKE, **_MOE}, num_experts=EXPERTS),
}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe")


def make_recent_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(RECENT_CONFIGS[family](), dtype=dtype).eval()
