"""GGUF models: a tiny Llama written with the ``gguf`` package loads back with the same logits,
trains, saves as a plain HF directory, and ``pkg:NAME`` finds a GGUF inside a package."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.errors import PosttrainError
from posttrain.models import gguf as pgguf
from posttrain.models.io import load_model, load_tokenizer
from posttrain.models.resolve import parse_spec, resolve_spec
from posttrain.models.tiny import build_model, build_tokenizer

gguf = pytest.importorskip("gguf")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved for its rotary kernel; transformers undoes this.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_llama_gguf(model, tok, path: Path, dtype: type = np.float32) -> Path:  # noqa: ANN001
    """The tiny Llama + its byte-level tokenizer as a GGUF file (norms always F32)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    special = set(tok.added_tokens_decoder)  # <|im_start|> etc.
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3 = control
    w.add_token_scores([0.0] * len(tokens))  # no merges: byte tokens only
    w.add_eos_token_id(tok.convert_tokens_to_ids("<|im_end|>"))
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def add(name: str, a: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(a.astype(np.float32 if a.ndim == 1 else dtype)))

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(b + "attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        add(b + "attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        add(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["model.norm.weight"])  # tied embeddings: no output.weight
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def source():
    return build_model("nano", seed=3).eval(), build_tokenizer()


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(pgguf.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _ids(tok) -> torch.Tensor:  # noqa: ANN001
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12+30?"},
                                    {"role": "assistant", "content": "42"}], tokenize=False)
    return torch.tensor([tok.encode(text)])


def test_f32_gguf_gives_the_source_logits_and_tokenizer(tmp_path, source):
    model, tok = source
    path = write_llama_gguf(model, tok, tmp_path / "nano.gguf")
    loaded, gtok = pgguf.load_gguf_model(path).eval(), pgguf.load_gguf_tokenizer(path)
    ids = _ids(tok)
    assert gtok.encode(tok.decode(ids[0])) == ids[0].tolist()
    assert gtok.chat_template == tok.chat_template and gtok.eos_token == "<|im_end|>"
    with torch.no_grad():
        # F32 tensors round-trip bit for bit; 1e-6 only allows for kernel-order differences.
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)


def test_f16_gguf_equals_the_source_rounded_to_f16(tmp_path, source):
    model, tok = source
    path = write_llama_gguf(model, tok, tmp_path / "nano16.gguf", dtype=np.float16)
    rounded = build_model("nano", seed=3).eval()
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim == 2:  # the writer stores matrices as F16, norms as F32
                p.copy_(p.half().float())
        ids = _ids(tok)
        torch.testing.assert_close(pgguf.load_gguf_model(path)(ids).logits, rounded(ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_gguf_spec_converts_once_trains_and_saves_plain_hf(tmp_path, source, cache, monkeypatch):
    model, tok = source
    path = write_llama_gguf(model, tok, tmp_path / "nano.gguf")
    assert parse_spec(str(path)).kind == "gguf"
    policy, ptok = load_model(str(path)), load_tokenizer(str(path))
    assert not getattr(policy, "is_quantized", False)
    assert getattr(policy, "hf_quantizer", None) is None
    hf_dir = Path(resolve_spec(str(path)))
    assert hf_dir.parent == cache / "models"
    assert "quantization_config" not in json.loads((hf_dir / "config.json").read_text())
    # Reused, not converted again.
    monkeypatch.setattr(pgguf, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert resolve_spec(str(path)) == str(hf_dir)
    # Trainable: a gradient step changes the weights.
    ids = _ids(ptok)
    loss = policy(ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(policy.parameters(), lr=1.0).step()
    out = tmp_path / "saved"
    policy.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(again.model.norm.weight, policy.model.norm.weight)


def test_pkg_spec_finds_the_gguf_inside_a_package(tmp_path, source, cache, monkeypatch):
    model, tok = source
    pkg = tmp_path / "site" / "fake_gguf_model"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    write_llama_gguf(model, tok, pkg / "model.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    hf_dir = resolve_spec("pkg:fake-gguf-model")  # PyPI-style dashes work too
    assert Path(hf_dir).parent == cache / "models"
    assert "fake_gguf_model" not in sys.modules
    assert resolve_spec("pkg:fake_gguf_model/model.gguf") == hf_dir
    with pytest.raises(PosttrainError, match="pip install no-such-model-pkg"):
        resolve_spec("pkg:no_such_model_pkg")
    with pytest.raises(PosttrainError, match="found none"):
        resolve_spec("pkg:fake_gguf_model/other.gguf")


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(PosttrainError, match="GGUF file not found"):
        load_model(str(tmp_path / "nope.gguf"))
