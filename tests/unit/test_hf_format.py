"""Apple's HF checkpoint layout: save -> load round trips, sharded folders, CoreNet keys, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import elmctl
from elmctl.config import load_recipe
from elmctl.errors import UsageError
from elmctl.model.hf import hf_config, model_config_from_hf, padded_vocab_for

# facts §7: the released OpenELM-270M config.json
APPLE_270M = {
    "activation_fn_name": "swish", "architectures": ["OpenELMForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_openelm.OpenELMConfig",
                 "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM"},
    "bos_token_id": 1, "eos_token_id": 2, "ffn_dim_divisor": 256,
    "ffn_multipliers": [0.5, 0.73, 0.97, 1.2, 1.43, 1.67, 1.9, 2.13, 2.37, 2.6, 2.83, 3.07, 3.3, 3.53, 3.77, 4.0],
    "ffn_with_glu": True, "head_dim": 64, "initializer_range": 0.02, "max_context_length": 2048,
    "model_dim": 1280, "model_type": "openelm", "normalization_layer_name": "rms_norm",
    "normalize_qk_projections": True, "num_gqa_groups": 4,
    "num_kv_heads": [3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5],
    "num_query_heads": [12, 12, 12, 12, 12, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20],
    "num_transformer_layers": 16, "qkv_multipliers": [0.5, 1.0], "rope_freq_constant": 10000,
    "rope_max_length": 4096, "share_input_output_layers": True, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 32000,
}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = elmctl.build_model("tiny")
    with torch.no_grad():  # non-trivial norm weights so a swapped/missing norm shows up
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 259, (2, 13), generator=torch.Generator().manual_seed(1))


def test_round_trip_files_keys_and_logits(tiny, ids, tmp_path):
    out = elmctl.save_pretrained(tiny, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folder cleaned up
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == {"transformer." + k for k in tiny.state_dict()}
    assert "lm_head.weight" not in tensors
    assert tensors["transformer.token_embeddings.weight"].shape == (259, 128)  # trimmed to HF vocab
    assert tensors["transformer.layers.1.attn.qkv_proj.weight"].shape == ((4 + 2 * 2) * 32, 128)

    loaded = elmctl.load_pretrained(out)
    assert loaded.config == tiny.config
    emb = loaded.token_embeddings.weight
    assert emb.shape == (320, 128) and torch.count_nonzero(emb[259:]) == 0  # padded back with zeros
    for name, p in tiny.state_dict().items():
        q = loaded.state_dict()[name]
        if name == "token_embeddings.weight":
            p, q = p[:259], q[:259]
        assert torch.equal(p, q), name
    torch.testing.assert_close(loaded(ids)[..., :259], tiny(ids)[..., :259], rtol=0, atol=0)


def test_config_json_has_apple_fields(tiny, tmp_path):
    elmctl.save_pretrained(tiny, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key, value in APPLE_270M.items():
        assert key in cfg, key
        if key not in ("ffn_multipliers", "num_kv_heads", "num_query_heads", "num_transformer_layers",
                       "model_dim", "head_dim", "num_gqa_groups", "ffn_dim_divisor", "max_context_length",
                       "rope_max_length", "vocab_size", "torch_dtype"):
            assert cfg[key] == value, key
    assert cfg["num_query_heads"] == [2, 4, 4, 4] and cfg["num_kv_heads"] == [1, 2, 2, 2]
    assert cfg["vocab_size"] == 259 and cfg["torch_dtype"] == "float32"
    assert cfg["elmctl_padded_vocab_size"] == 320 and cfg["elmctl_pad_token_id"] == 259


def test_270m_config_equals_apple_release():
    model = elmctl.build_model("270m", device="meta")
    cfg = hf_config(model, 32000, torch.bfloat16)
    for key, value in APPLE_270M.items():
        assert cfg[key] == value, key
    # and Apple's file, read back, is the 270m recipe's architecture
    assert model_config_from_hf(APPLE_270M) == load_recipe("270m").model


def test_padded_vocab_rule():
    assert padded_vocab_for(32000) == (32128, 32000)
    assert padded_vocab_for(259) == (384, 259)
    assert padded_vocab_for(127) == (128, 127)
    assert padded_vocab_for(128) == (256, 128)


def test_bf16_export_and_untied_head(ids, tmp_path):
    torch.manual_seed(2)
    model = elmctl.build_model("tiny", share_input_output_layers=False)
    elmctl.save_pretrained(model, tmp_path, dtype="bfloat16")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["lm_head.weight"].shape == (259, 128) and tensors["lm_head.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = elmctl.load_pretrained(tmp_path, dtype=None)
    assert loaded.token_embeddings.weight.dtype == torch.bfloat16
    assert loaded.rope.cos.dtype == torch.float32
    ref = model.to(torch.bfloat16)(ids)[..., :259]
    torch.testing.assert_close(loaded(ids)[..., :259], ref, rtol=0, atol=0)


def test_sharded_folder_loads(tiny, ids, tmp_path):
    elmctl.save_pretrained(tiny, tmp_path / "one")
    tensors = load_file(str(tmp_path / "one" / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    loaded = elmctl.load_pretrained(folder)
    torch.testing.assert_close(loaded(ids), elmctl.load_pretrained(tmp_path / "one")(ids), rtol=0, atol=0)

    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UsageError, match="model-00002-of-00002.safetensors"):
        elmctl.load_pretrained(folder)


def test_corenet_style_keys_with_padded_rows(tiny, ids, tmp_path):
    elmctl.save_pretrained(tiny, tmp_path)
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded = elmctl.load_pretrained(tmp_path)
    assert torch.equal(loaded.token_embeddings.weight, tiny.token_embeddings.weight)  # all 320 rows kept
    torch.testing.assert_close(loaded(ids), tiny(ids), rtol=0, atol=0)


def test_save_into_existing_folder_keeps_other_files(tiny, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    elmctl.save_pretrained(tiny, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    elmctl.load_pretrained(tmp_path)


def test_errors_for_bad_folders(tiny, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        elmctl.load_pretrained(tmp_path / "nope")
    with pytest.raises(UsageError, match="no config.json"):
        elmctl.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        elmctl.load_pretrained(tmp_path)
    elmctl.save_pretrained(tiny, tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())

    def with_config(**change):
        (tmp_path / "config.json").write_text(json.dumps({**good, **change}))

    with_config(model_type="llama")
    with pytest.raises(UsageError, match="model_type"):
        elmctl.load_pretrained(tmp_path)
    with_config(num_query_heads=[2, 4, 4, 8])
    with pytest.raises(UsageError, match="num_query_heads"):
        elmctl.load_pretrained(tmp_path)
    with_config(head_dim=48)
    with pytest.raises(UsageError, match="head_dim"):
        elmctl.load_pretrained(tmp_path)
    bad = dict(good)
    del bad["model_dim"]
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(UsageError, match="model_dim"):
        elmctl.load_pretrained(tmp_path)
    with_config()

    tensors = load_file(str(tmp_path / "model.safetensors"))
    wrong = dict(tensors)
    wrong["transformer.layers.2.ffn.proj_2.weight"] = torch.zeros(128, 10)
    save_file(wrong, str(tmp_path / "model.safetensors"))
    with pytest.raises(UsageError, match=r"transformer\.layers\.2\.ffn\.proj_2\.weight.*\[128, 10\]"):
        elmctl.load_pretrained(tmp_path)
    missing = {k: v for k, v in tensors.items() if k != "transformer.norm.weight"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(UsageError, match="missing.*norm.weight"):
        elmctl.load_pretrained(tmp_path)
    save_file({**tensors, "transformer.extra.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UsageError, match="unexpected.*extra.weight"):
        elmctl.load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="cannot read"):
        elmctl.load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="neither model.safetensors"):
        elmctl.load_pretrained(tmp_path)
    with pytest.raises(UsageError, match="vocab_size"):
        elmctl.save_pretrained(tiny, tmp_path / "x", vocab_size=321)
