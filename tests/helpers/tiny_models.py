"""Tiny random models of every supported family, saved like a hub checkpoint, built offline in a second.

`save_tiny_model(family, directory)` writes `config.json`, `model.safetensors`, `generation_config.json` and a
byte-level BPE tokenizer (trained in code on a fixed text, exactly as many tokens as the model's vocab, with a
ChatML chat template) into `directory` and returns it, ready for `checkpoint.resolve(str(directory))`, for
`AutoModelForCausalLM.from_pretrained` and for the client. Nothing is downloaded.

Each family switches on what makes it differ from plain Llama, so the tests exercise it:
  llama    tied embeddings, llama3 rope scaling
  mistral  sliding window of 8 on every layer (prompts plus 32 new tokens are longer), untied head
  qwen2    q/k/v biases (no o_proj bias); sliding window only on layers >= max_window_layers; tied head
  qwen3    per-head q/k RMSNorm, biases on q/k/v/o (attention_bias), untied head
  mixtral  4 experts, top-2 routing, untied head
  qwen3_moe  q/k norms, 8 experts top-2 (not renormalized), layer 1 dense (mlp_only_layers), untied head
  deepseek_v3  latent attention (q and kv LoRA ranks, interleaved rope), first layer dense, then 8 routed
           experts in 4 groups (top-2 groups, top-2 experts, sigmoid + correction bias) + 1 shared expert
Weights use initializer_range 0.2, so logits are spread out and greedy decoding is not a coin toss.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

FAMILIES_UNDER_TEST = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "deepseek_v3")

VOCAB_SIZE = 512  # the tokenizer's too: 3 special tokens, 256 bytes, 253 merges
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad/bos, turn start, eos
PAD_ID, BOS_ID, EOS_ID = 0, 0, 2
SLIDING_WINDOW = 8
SEED = 0

CORPUS = """\
The quick brown fox jumps over the lazy dog while the small cat sleeps by the warm window.
A swarm of volunteer machines can run a large language model together: each node serves a span of
transformer blocks, and the client keeps the embeddings and the head. Hello, world! How are you today?
I am fine, thank you. What is the capital of France? Paris is the capital of France, and Berlin is the
capital of Germany. Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2024 appear in text as well.
Once upon a time there was a little robot who wanted to learn how to write stories about the sea,
the mountains, the rivers and the forests. Every morning it read books, and every evening it wrote.
"""
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(family: str) -> PretrainedConfig:
    """The transformers config of the tiny `family` model (hidden 64, 4 heads of 16, 2 KV heads)."""
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    if family == "llama":
        rope = dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        )
        return LlamaConfig(**common, num_hidden_layers=4, tie_word_embeddings=True, rope_parameters=rope)
    if family == "mistral":
        return MistralConfig(**common, num_hidden_layers=5, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(
            **common,
            num_hidden_layers=4,
            use_sliding_window=True,
            sliding_window=SLIDING_WINDOW,
            max_window_layers=2,  # layers 0, 1 attend to everything; 2, 3 to the last 8 tokens
            tie_word_embeddings=True,
        )
    if family == "qwen3":
        return Qwen3Config(**common, num_hidden_layers=6, head_dim=16, attention_bias=True, tie_word_embeddings=False)
    if family == "mixtral":
        return MixtralConfig(
            **{**common, "intermediate_size": 96},
            num_hidden_layers=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
        )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **common,
            num_hidden_layers=4,
            head_dim=16,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            tie_word_embeddings=False,
        )
    if family == "deepseek_v3":
        return DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            num_hidden_layers=4,
            q_lora_rank=32,
            kv_lora_rank=24,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            tie_word_embeddings=False,
        )
    raise ValueError(f"no tiny model for family {family!r}; known: {', '.join(FAMILIES_UNDER_TEST)}")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on CORPUS up to exactly VOCAB_SIZE tokens, so every id the model can emit decodes.

    Training is deterministic: the same text gives the same merges, hence the same files, on every run.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, "CORPUS is too small for VOCAB_SIZE merges"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        pad_token=SPECIAL_TOKENS[PAD_ID],
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny_model(family: str, directory: Path) -> Path:
    """Builds the seeded tiny `family` model in float32 and saves it with its tokenizer into `directory`."""
    config = tiny_config(family)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # DeepSeek: zeros at init; nonzero, it steers the routing
            buffer.normal_(0.0, 0.1)
    directory = Path(directory)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
