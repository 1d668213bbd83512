"""A Qwen3-MoE GGUF (experts fused per layer into 3-D `ffn_{gate,up,down}_exps`, as llama.cpp writes them) runs
in torchnode exactly as in transformers' own GGUF loader.

The file is written here with gguf's writer from the tiny random Qwen3-MoE, with llama.cpp's tensor names and
metadata (`qwen3moe.*`, a byte-level BPE tokenizer), its weights in F32 (the file must give back the original
model), Q8_0 (quantized 3-D experts) or Q4_0 (served by `--quant int4` from the file's own codes, experts
included). transformers' GGUF config reader skips `expert_feed_forward_length` and would build 768-wide
experts, so its reference model is given the width the file states.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from greedy import span_greedy
from swarm import start_nodes, stop_all
from tiny_models import SEED, tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM

from torchnode.client.sync_model import DistributedModel
from torchnode.models.checkpoint import Checkpoint, resolve
from torchnode.models.families import LAYER_PREFIX, load_head, load_span
from torchnode.models.gguf_q4 import read_gguf_q4_blocks
from torchnode.models.quantization import Int4Linear

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

TOLERANCE = 1e-4
NEW_TOKENS = 16
GGUF_NAME = "tiny-qwen3-moe.gguf"
INT4_AGREEMENT = 56  # of 4 x 16 next tokens, int4 from Q4_0 codes vs floats; measured 59 (41, experts re-quantized)
NEAR_TIE = 0.15  # where they differ, the floats' top two logits are at most this far apart (measured <= 0.113)


def tiny_moe() -> torch.nn.Module:
    """The tiny Qwen3-MoE as a qwen3moe GGUF describes it: every layer sparse, top-k renormalized (llama.cpp's)."""
    config = tiny_config("qwen3_moe")
    config.mlp_only_layers, config.norm_topk_prob = [], True
    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def write_gguf(model: torch.nn.Module, path: Path, qtype: str) -> Path:
    """`model` as llama.cpp's convert_hf_to_gguf writes a Qwen3-MoE: experts stacked (E, I, C) per layer."""
    import gguf
    from gguf import MODEL_TENSOR as T
    from gguf import TENSOR_NAMES

    c, tok, kind = model.config, tiny_tokenizer(), gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    vocab = sorted(tok.get_vocab(), key=tok.get_vocab().get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(vocab)
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t in vocab])  # 3: control
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)

    weights = {k: v.numpy() for k, v in model.state_dict().items()}

    def add(tensor: T, array: np.ndarray, layer: int | None = None, quantize: bool = True) -> None:
        name = TENSOR_NAMES[tensor].format(bid=layer) + ".weight"
        if quantize and array.ndim >= 2 and kind != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, np.ascontiguousarray(array))

    add(T.TOKEN_EMBD, weights["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        add(T.ATTN_NORM, weights[p + "input_layernorm.weight"], i)
        for tensor, name in [(T.ATTN_Q, "q"), (T.ATTN_K, "k"), (T.ATTN_V, "v"), (T.ATTN_OUT, "o")]:
            add(tensor, weights[p + f"self_attn.{name}_proj.weight"], i)
        add(T.ATTN_Q_NORM, weights[p + "self_attn.q_norm.weight"], i)
        add(T.ATTN_K_NORM, weights[p + "self_attn.k_norm.weight"], i)
        add(T.FFN_NORM, weights[p + "post_attention_layernorm.weight"], i)
        add(T.FFN_GATE_INP, weights[p + "mlp.gate.weight"], i, quantize=False)  # the router stays F32
        gate, up = np.split(weights[p + "mlp.experts.gate_up_proj"], 2, axis=1)  # (E, I, C) each
        add(T.FFN_GATE_EXP, gate, i)
        add(T.FFN_UP_EXP, up, i)
        add(T.FFN_DOWN_EXP, weights[p + "mlp.experts.down_proj"], i)  # (E, C, I)
    add(T.OUTPUT_NORM, weights["model.norm.weight"])
    add(T.OUTPUT, weights["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def original() -> torch.nn.Module:
    return tiny_moe()


def transformers_gguf(path: Path, original: torch.nn.Module) -> torch.nn.Module:
    """transformers' GGUF loader on the file; it reads no expert width, so it is given the file's."""
    return AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=torch.float32,
        moe_intermediate_size=original.config.moe_intermediate_size,
    ).eval()


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_qwen3_moe_gguf_spans_equal_transformers_gguf_loader(qtype, original, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHNODE_CACHE", str(tmp_path / "cache"))
    path = write_gguf(original, tmp_path / GGUF_NAME, qtype)
    reference = transformers_gguf(path, original)
    ids = torch.randint(3, 259, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
        )
        expected_logits = reference(expected).logits  # (1, T + N, V)
        if qtype == "F32":  # the file itself is right: F32 gives back the model it was written from
            assert (original(expected).logits - expected_logits).abs().max().item() <= TOLERANCE

    ckpt = resolve(str(path))
    assert ckpt.path.is_relative_to(tmp_path / "cache")
    assert ckpt.hf_config.moe_intermediate_size == original.config.moe_intermediate_size  # from the metadata
    blocks = ckpt.hf_config.num_hidden_layers
    spans = [load_span(ckpt, 0, 1), load_span(ckpt, 1, blocks)]
    head = load_head(ckpt)
    caches = [span.new_caches(span.start, span.end, 1, expected.shape[1]) for span in spans]

    def forward(x: torch.Tensor, position: int) -> torch.Tensor:
        x = head.embed(x)
        for span, span_caches in zip(spans, caches, strict=True):
            x = span(x, position, span.start, span.end, span_caches)  # (1, T, hidden)
        return head.logits(x)  # (1, T, V)

    with torch.inference_mode():
        logits = [forward(ids, 0)]
        tokens = []
        for step in range(NEW_TOKENS):
            tokens.append(logits[-1][:, -1:].argmax(-1))  # (1, 1)
            if step < NEW_TOKENS - 1:
                logits.append(forward(tokens[-1], ids.shape[1] + step))
    assert torch.cat([ids, *tokens], dim=1).tolist() == expected.tolist()
    diff = (torch.cat(logits, dim=1) - expected_logits[:, :-1]).abs().max().item()
    assert diff <= TOLERANCE, f"{qtype}: logits differ from transformers' GGUF loader by {diff:.2e}"


def test_a_node_serves_a_qwen3_moe_gguf(original, tmp_path, monkeypatch):
    """`torchnode join FILE.gguf` converts the file and serves it; a client on the same file gets transformers'."""
    monkeypatch.setenv("TORCHNODE_CACHE", str(tmp_path / "cache"))  # the node's and the client's
    path = write_gguf(original, tmp_path / GGUF_NAME, "Q8_0")
    reference = transformers_gguf(path, original)
    ids = torch.tensor([[1, 5, 9, 14, 3, 27]])
    with torch.inference_mode():
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    nodes = start_nodes(str(path), [f"0:{original.config.num_hidden_layers}"])
    try:
        with DistributedModel.from_pretrained(str(path), [n.address for n in nodes]) as model:
            got = model.generate(ids, max_new_tokens=8)
    finally:
        stop_all(nodes)
    assert got.tolist() == expected.tolist()


@pytest.fixture(scope="module")
def q4_0(original, tmp_path_factory) -> tuple[Path, Checkpoint]:
    """The tiny Qwen3-MoE as a Q4_0 GGUF (rows of 64 or 32 inputs: whole blocks) and its converted checkpoint."""
    tmp = tmp_path_factory.mktemp("q4_0")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHNODE_CACHE", str(tmp / "cache"))
        path = write_gguf(original, tmp / GGUF_NAME, "Q4_0")
        return path, resolve(str(path))


def test_q4_0_experts_are_kept_as_their_own_blocks(q4_0, original):
    """Each expert's blocks, served with float32 scales, are gguf's own dequantization of that expert's slice of
    `ffn_{gate,up,down}_exps` bit for bit, and transformers' GGUF loader's weights of that expert (gate rows
    first in its fused gate_up_proj; down_proj (C, I), rows = outputs, as the file's)."""
    from gguf import GGUFReader, dequantize

    path, ckpt = q4_0
    c, i = original.config, original.config.moe_intermediate_size
    exps = {t.name: t for t in GGUFReader(path).tensors if "_exps" in t.name}
    loaded = transformers_gguf(path, original).state_dict()
    blocks = read_gguf_q4_blocks(ckpt.path, lambda key: ".experts." in key)
    assert len(blocks) == c.num_hidden_layers * c.num_experts * 3
    for key, (kind, raw) in blocks.items():
        layer, _, _, expert, proj, _ = key.removeprefix(LAYER_PREFIX).split(".")  # N mlp experts E gate_proj weight
        layer, expert, proj = int(layer), int(expert), proj.removesuffix("_proj")
        served = Int4Linear.from_gguf(kind, raw, torch.float32).dequantized()
        stack = exps[f"blk.{layer}.ffn_{proj}_exps.weight"]
        assert kind == stack.tensor_type.name == "Q4_0"
        assert torch.equal(served, torch.from_numpy(dequantize(stack.data[expert], stack.tensor_type))), key
        fused = f"{LAYER_PREFIX}{layer}.mlp.experts."
        theirs = {
            "gate": loaded[fused + "gate_up_proj"][expert, :i],
            "up": loaded[fused + "gate_up_proj"][expert, i:],
            "down": loaded[fused + "down_proj"][expert],
        }[proj]
        assert torch.equal(served, theirs), f"{key} is not transformers' {proj} weights of expert {expert}"


def test_an_int4_span_serves_the_q4_0_experts_without_reading_their_floats(q4_0, original, monkeypatch):
    """Every linear, experts included, is built from the file's codes, and the fused float experts are not read."""
    _, ckpt = q4_0
    read: list[str] = []
    real = Checkpoint.read_tensors

    def recording(self, wanted, *args, **kwargs):  # the real read, keeping note of what it was asked for
        tensors = real(self, wanted, *args, **kwargs)
        read.extend(tensors)
        return tensors

    monkeypatch.setattr(Checkpoint, "read_tensors", recording)
    messages: list[str] = []
    c = original.config
    span = load_span(ckpt, 0, c.num_hidden_layers, quant="int4", on_status=messages.append)
    linears = c.num_hidden_layers * (4 + 3 * c.num_experts)  # q, k, v, o and each expert's three
    assert messages == [f"int4: {linears} of {linears} linears served from the GGUF's own Q4_0 codes"]
    assert isinstance(span.get_submodule("layers.3.mlp.experts.7.down_proj"), Int4Linear)
    assert read and not [key for key in read if ".experts." in key or key.endswith("_proj.weight")]


def test_int4_from_the_q4_0_codes_answers_as_the_dequantized_floats(q4_0, original):
    """Fed the float span's greedy answers to 4 prompts, the int4 span (bf16 scales, as the CPU kernel takes
    them) picks the same next token at INT4_AGREEMENT of 64 positions or more, and only near-ties differ: a
    random tiny model's logits are close together (median top-2 gap 0.1-0.5), and a routing flip moves them."""
    _, ckpt = q4_0
    head, blocks = load_head(ckpt), original.config.num_hidden_layers
    floats, int4 = load_span(ckpt, 0, blocks), load_span(ckpt, 0, blocks, quant="int4")

    def logits(span, ids: torch.Tensor) -> torch.Tensor:
        caches = span.new_caches(0, blocks, 1, ids.shape[1])
        return head.logits(span(head.embed(ids), 0, 0, blocks, caches))[0]  # (T, V)

    agree, gaps = 0, []
    with torch.inference_mode():
        for seed in range(4):
            ids = torch.randint(3, 259, (1, 10), generator=torch.Generator().manual_seed(seed))
            answer = torch.cat([ids, torch.tensor([span_greedy(head, floats, ids, NEW_TOKENS)])], dim=1)
            expected, got = logits(floats, answer)[9:-1], logits(int4, answer)[9:-1]  # (16, V): next tokens
            same = expected.argmax(-1) == got.argmax(-1)
            agree += int(same.sum())
            top2 = expected.topk(2).values
            gaps += (top2[:, 0] - top2[:, 1])[~same].tolist()
    assert agree >= INT4_AGREEMENT, f"{agree} of 64"
    assert all(gap < NEAR_TIE for gap in gaps), gaps
