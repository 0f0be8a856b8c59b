"""A tiny, deterministic, offline tokenizer for tests: byte-level BPE trained in-process.

Byte-level (not a character WordLevel) so any text round-trips and BPE merges exist, the way a real LLM tokenizer
behaves; Llama-like special tokens: `<s>` is prepended by the post-processor and `</s>` ends a sequence, so tests
exercise the "one BOS, EOS appended by us" logic of `adapters_ds.training.data`. It also carries a small chat
template that starts with `{{ bos_token }}` (as Llama 3's does), to check that BOS is not added twice.

Models built for tests from configs should use `vocab_size=VOCAB_SIZE` (== `len(tokenizer)`).
"""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 512
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Enough text that BPE fills the whole vocabulary: the Alpaca template words, digits and arithmetic.
_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n<|user|>\n<|assistant|>\n",
    "The answer is 42. Let's think step by step. How many apples does she have left? Answer Choices: (A) (B) (C)",
    "She has 12 apples and buys 30 more, so she has 12 + 30 = 42 apples. The total cost is 3 * 7 = 21 dollars.",
    "the quick brown fox jumps over the lazy dog THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    " ".join(f"{a} + {b} = {a + b}." for a in range(0, 100, 7) for b in range(0, 100, 11)),
    " ".join(f"{a} * {b} = {a * b}; {a} - {b} = {a - b}; {a} / {b}" for a in range(1, 60, 5) for b in range(1, 40, 3)),
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train once per process; the trainer is deterministic for a fixed corpus, so every build is identical."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer: expected {VOCAB_SIZE} tokens, trained {tok.get_vocab_size()}")
    return tok.to_str()


def make_tokenizer(tmp_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A fresh tiny tokenizer (< 0.1 s after the first build); saved with `save_pretrained` into `tmp_dir` if given."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if tmp_dir is not None:
        tokenizer.save_pretrained(str(tmp_dir))
    return tokenizer
