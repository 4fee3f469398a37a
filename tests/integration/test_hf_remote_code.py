"""Our Hugging Face modelling code: an elmctl export loads in transformers and computes what elmctl does.

The folder is ``elmctl.save_pretrained`` + ``write_hf_code`` + ``write_tokenizer_files``. One
subprocess loads it the way a user would (``AutoConfig`` / ``AutoModelForCausalLM`` with
``trust_remote_code=True``, ``HF_HUB_OFFLINE=1``, fp32 and bf16, ``AutoTokenizer``); the other tests
import the classes from ``elmctl.model.hf_code`` directly (no module cache written to ~/.cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import elmctl
from elmctl.config import load_recipe
from elmctl.config.derived import layer_shapes
from elmctl.data.chat import encode_chat
from elmctl.data.tokenizers import load_tokenizer
from elmctl.model.generate import generate
from elmctl.model.hf_export import CHAT_TEMPLATE, write_hf_code, write_tokenizer_files

transformers = pytest.importorskip("transformers")

from elmctl.model.hf_code.configuration_openelm import OpenELMConfig  # noqa: E402  (needs transformers)
from elmctl.model.hf_code.modeling_openelm import OpenELMForCausalLM  # noqa: E402

# facts §7: the keys of Apple's released config.json (OpenELM-270M); no rms_norm_eps, no elmctl_* keys
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
    "transformers_version": "4.39.3", "use_cache": True, "vocab_size": 32000,
}
V = 259  # tiny recipe: byte vocabulary
# from_pretrained's dtype argument: `dtype` since transformers 5, `torch_dtype` before
FP32 = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}


def _tiny(seed: int = 0, **overrides) -> elmctl.OpenELM:
    torch.manual_seed(seed)
    model = elmctl.build_model("tiny", **overrides)
    with torch.no_grad():  # non-trivial norm weights, so a swapped or missing norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(elmctl model, folder): a tiny tuned model exported with our code, byte tokenizer and chat template."""
    model = _tiny()
    folder = tmp_path_factory.mktemp("export")
    elmctl.save_pretrained(model, folder)
    write_hf_code(folder)
    write_tokenizer_files("byte", folder, chat_template=CHAT_TEMPLATE, model_max_length=model.config.context_length)
    return model, folder


SCRIPT = textwrap.dedent("""
    import sys, torch, transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder, inputs, out = sys.argv[1:4]
    x = torch.load(inputs)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    res = {"config": type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **{dtype_kw: dtype})
        res[name + "_dtype"] = str(model.dtype)
        with torch.no_grad():
            res[name] = model(x["ids"], use_cache=False).logits.float()
            res[name + "_cached"] = model(x["ids"]).logits.float()
        if name == "fp32":
            res["generate"] = [model.generate(p[None], max_new_tokens=x["n"], do_sample=False)[0, len(p):]
                               for p in x["prompts"]]
    tok = AutoTokenizer.from_pretrained(folder)
    res["text_ids"] = tok(x["text"]).input_ids
    res["chat_ids"] = list(tok.apply_chat_template(x["messages"], add_generation_prompt=True, tokenize=True,
                                                   return_dict=False))
    torch.save(res, out)
""")


def test_auto_classes_offline_fp32_bf16_and_generate(export, tmp_path, cli):
    """The folder loads with the Auto classes offline; logits within 1e-5 of elmctl's (fp32), bf16 as
    elmctl's bf16; greedy ``model.generate`` (KV cache) gives the tokens ``elmctl generate`` gives."""
    model, folder = export
    tok = load_tokenizer("byte")
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 17 + 25? 😀"}]
    text = "Café crème 😀\n\tdone"
    plain, question = "The quick brown fox", "What is 17 + 25?"
    # what `elmctl generate` feeds the model: BOS + the prompt's tokens, or (--chat) one user turn in the template
    prompts = [torch.tensor(tok.encode(plain, add_bos=True)), torch.tensor(encode_chat(tok, [{"role": "user", "content": question}]))]
    n = 24
    torch.save({"ids": ids, "prompts": prompts, "n": n, "text": text, "messages": messages}, tmp_path / "in.pt")
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    run = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(folder), str(tmp_path / "in.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, env=env,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    res = torch.load(tmp_path / "out.pt")
    assert res["config"] == "OpenELMConfig"
    assert (res["fp32_dtype"], res["bf16_dtype"]) == ("torch.float32", "torch.bfloat16")

    with torch.no_grad():
        ref = model(ids)[..., :V]
        ref_bf16 = elmctl.load_pretrained(folder, dtype=torch.bfloat16)(ids)[..., :V].float()
    torch.testing.assert_close(res["fp32"], ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(res["fp32_cached"], ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(res["bf16"], ref_bf16, rtol=0, atol=1e-2)

    for prompt, hf_new in zip(prompts, res["generate"]):
        ours = generate(model, prompt, n, eos_id=tok.eos_id)[len(prompt):]
        assert hf_new.tolist() == ours.tolist()
    # ... and `elmctl generate` on the exported folder (plain and --chat) prints those tokens' text
    for (prompt, chat), hf_new in zip(((plain, False), (question, True)), res["generate"]):
        out = cli("generate", folder, "--prompt", prompt, "-n", str(n), "--chat" if chat else "--no-chat",
                  "--format", "json")
        assert out.code == 0, out.err
        new = [t for t in hf_new.tolist() if t != tok.eos_id]
        assert json.loads(out.out)["completion"] == load_tokenizer(folder).decode(new)

    assert res["text_ids"] == tok.encode(text, add_bos=True)
    assert res["chat_ids"] == encode_chat(tok, messages)


def test_hf_code_is_self_contained(export):
    _, folder = export
    for name in ("configuration_openelm.py", "modeling_openelm.py"):
        source = (folder / name).read_text()
        imports = {line.split()[1].split(".")[0] for line in source.splitlines()
                   if line.startswith(("import ", "from ")) and not line.startswith("from .")}
        assert imports <= {"__future__", "typing", "torch", "transformers"}, (name, imports)


def test_left_padded_batch_generates_like_single_prompts(export):
    model, folder = export
    hf = OpenELMForCausalLM.from_pretrained(folder, **FP32).eval()
    a, b = [5, 80, 81, 82, 83, 84, 85, 86], [7, 90, 91]
    batch = torch.tensor([a, [0] * (len(a) - len(b)) + b])
    mask = torch.tensor([[1] * len(a), [0] * (len(a) - len(b)) + [1] * len(b)])
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    for row, prompt in zip(out, (a, b)):
        alone = generate(model, torch.tensor(prompt), 10)[len(prompt):]
        assert row[len(a):].tolist() == alone.tolist()


def test_loss_hidden_states_tuple_and_untied_head(tmp_path):
    model = _tiny(seed=4, share_input_output_layers=False)
    elmctl.save_pretrained(model, tmp_path)
    hf = OpenELMForCausalLM.from_pretrained(tmp_path, **FP32).eval()
    assert hf.lm_head is not None
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        ref = model(ids)[..., :V]
        out = hf(ids, labels=labels, output_hidden_states=True, use_cache=False)
        as_tuple = hf(ids, use_cache=False, return_dict=False)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)
    want = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-6)
    assert len(out.hidden_states) == model.config.num_layers + 1
    torch.testing.assert_close(as_tuple[0], out.logits)


def test_transformers_save_pretrained_loads_back_in_elmctl(export, tmp_path):
    """A model saved by transformers (after fine-tuning there, say) is an elmctl model again."""
    model, folder = export
    OpenELMForCausalLM.from_pretrained(folder, **FP32).save_pretrained(tmp_path)
    back = elmctl.load_pretrained(tmp_path)
    assert back.config == model.config
    ids = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[..., :V], model(ids)[..., :V], rtol=0, atol=0)


def test_apple_release_config_loads(export, tmp_path):
    """A config.json with only the keys Apple ships (our code swapped into an apple/OpenELM-* folder)."""
    model, folder = export
    ours = json.loads((folder / "config.json").read_text())
    apple_style = {k: v for k, v in ours.items() if k in APPLE_270M}
    assert set(APPLE_270M) - set(apple_style) == {"transformers_version"}
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(apple_style))
    hf = OpenELMForCausalLM.from_pretrained(tmp_path, **FP32).eval()
    ids = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[..., :V], rtol=0, atol=1e-5)

    cfg = OpenELMConfig.from_dict(APPLE_270M)  # the released 270M file itself
    assert cfg.num_query_heads == APPLE_270M["num_query_heads"] and cfg.num_kv_heads == APPLE_270M["num_kv_heads"]
    assert cfg.num_hidden_layers == 16 and cfg.hidden_size == 1280
    with torch.device("meta"):
        released = OpenELMForCausalLM(cfg)
    assert sum(p.numel() for p in released.parameters()) == 271_527_168  # facts §4


@pytest.mark.parametrize("recipe", ["tiny", "270m", "450m", "1_1b", "3b"])
def test_layer_widths_from_multipliers_match_elmctl(recipe):
    """Without per-layer lists the config derives them as elmctl does (2-decimal rounding quirks included)."""
    m = load_recipe(recipe).model
    cfg = OpenELMConfig(num_transformer_layers=m.num_layers, model_dim=m.model_dim, head_dim=m.head_dim,
                        num_gqa_groups=m.num_gqa_groups, qkv_multipliers=list(m.qkv_multipliers),
                        ffn_multipliers=list(m.ffn_multipliers), ffn_dim_divisor=m.ffn_dim_divisor)
    shapes = layer_shapes(m)
    assert cfg.num_query_heads == [s.query_heads for s in shapes]
    assert cfg.num_kv_heads == [s.kv_heads for s in shapes]
    assert [cfg.ffn_dim(i) for i in range(m.num_layers)] == [s.ffn_dim for s in shapes]


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="num_query_heads"):
        OpenELMConfig(num_transformer_layers=2, num_query_heads=[4], num_kv_heads=[1, 1])
    with pytest.raises(ValueError, match="ffn_multipliers"):
        OpenELMConfig(num_transformer_layers=3, ffn_multipliers=[1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="SwiGLU"):
        OpenELMConfig(ffn_with_glu=False)


@pytest.mark.slow  # a random 1.1B-shaped model (~4.4 GB fp32, built once; the HF model shares its tensors)
def test_1_1b_shaped_random_model():
    """The per-layer widths of 1.1B (rounding quirks at layers 3/10/13/14/17) from the config.json elmctl writes."""
    from elmctl.model.hf import hf_config

    model = elmctl.build_model("1_1b", device="meta")  # skip nn.Linear's own init: one random fill, not two
    model.to_empty(device="cpu")
    model.rope.reset_cache()
    model.reset_parameters(torch.Generator().manual_seed(7))
    model.eval()
    vocab = model.config.vocab_size
    cfg = OpenELMConfig.from_dict(hf_config(model, vocab, torch.float32))
    assert cfg.num_query_heads == [s.query_heads for s in layer_shapes(model.config)]
    with torch.device("meta"):
        hf = OpenELMForCausalLM(cfg)
    state = {"transformer." + k: (v[:vocab] if k == "token_embeddings.weight" else v)
             for k, v in model.state_dict().items()}
    hf.load_state_dict(state, assign=True, strict=True)  # the same storage: no second copy
    ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids, use_cache=False).logits, model(ids)[..., :vocab], rtol=0, atol=1e-5)
