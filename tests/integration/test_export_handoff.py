"""`elmctl export` hands off a model: the folder loads in transformers, AutoTokenizer and mlx_lm as it does in elmctl.

A tiny pre-training run and a DPO tune of it on the demo data, exported through the CLI as a user
would; then, in fresh processes with ``HF_HUB_OFFLINE=1``: transformers (``trust_remote_code``)
logits within 1e-5 of ``elmctl.load_pretrained``'s, greedy ``model.generate`` equal to ``elmctl
generate RUN``'s completion, ``AutoTokenizer`` ids equal to elmctl's, and ``python -m mlx_lm
generate`` exiting 0 with elmctl's greedy text. Also: sharded export, ``--dtype bf16``, file modes,
the tuned model's chat template.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

SMALL = ["--set", "model.context_length=64", "--set", "pretrain.sequences_per_gpu=4",
         "--set", "pretrain.warmup_iterations=2", "--set", "pretrain.max_iterations=30"]
PROMPT = "What is 17 + 25?"
N = 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(home, data): a pretrain run 'pt' and a tune run 'ft' of it, in a store of their own."""
    from elmctl.cli.main import main
    from elmctl.data.demo import make_demo

    root = tmp_path_factory.mktemp("handoff")
    data = root / "D"
    make_demo(data, seed=0, num_pairs=240, num_test_pairs=40)  # the tune: 30 steps, enough to hand off
    env = {"ELMCTL_HOME": str(root / "home"), "ELMCTL_LOCK_DIR": str(root / "locks")}
    old = {k: os.environ.get(k) for k in (*env, "ELMCTL_STORE")}
    os.environ.update(env)
    os.environ.pop("ELMCTL_STORE", None)
    try:
        assert main(["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(data), "--name", "pt",
                     *SMALL, "--format", "json"]) == 0
        assert main(["tune", "--recipe", "tiny", "--device", "cpu", "--base", "pt", "--data", str(data),
                     "--name", "ft", "--epochs", "1", "--lr", "1e-3", "--set", "model.context_length=64",
                     "--format", "json"]) == 0
        yield root
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ELMCTL_HOME": str(root / "home"), "ELMCTL_LOCK_DIR": str(root / "locks")}
    env.pop("ELMCTL_STORE", None)
    return subprocess.run([str(Path(sys.executable).parent / "elmctl"), *args], capture_output=True, text=True,
                          env=env, timeout=300, stdin=subprocess.DEVNULL)


def _export(root: Path, run: str, to: Path, *extra: str) -> dict:
    r = _cli(root, "export", run, "--to", str(to), "--format", "json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


HF = textwrap.dedent("""
    import json, sys, torch, transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, out, prompt, n, chat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
    kw = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kw)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    else:
        ids = tok(prompt).input_ids
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        logits = model(x).logits[0]
    new = model.generate(x, max_new_tokens=n, do_sample=False)[0, x.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    torch.save({"ids": list(ids), "logits": logits, "new": new, "text": tok.decode(new)}, out)
""")


def _hf(folder: Path, tmp: Path, chat: bool) -> dict:
    (tmp / "hf.py").write_text(HF)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home")}
    r = subprocess.run([sys.executable, str(tmp / "hf.py"), str(folder), str(tmp / "hf.pt"), PROMPT, str(N),
                        "1" if chat else "0"], capture_output=True, text=True, env=env, timeout=300,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(tmp / "hf.pt")


@pytest.mark.parametrize("run,chat", [("pt", False), ("ft", True)])
def test_export_loads_in_transformers_like_elmctl(runs, tmp_path, run, chat):
    import elmctl
    from elmctl.data.chat import encode_chat
    from elmctl.data.tokenizers import load_tokenizer

    to = tmp_path / "out"
    info = _export(runs, run, to)
    for name in ("config.json", "model.safetensors", "configuration_openelm.py", "modeling_openelm.py",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "elmctl_export.json"):
        assert name in info["files"], name
    config = json.loads((to / "tokenizer_config.json").read_text())
    assert ("chat_template" in config) == chat

    hf = _hf(to, tmp_path, chat)
    tok = load_tokenizer("byte")
    ids = encode_chat(tok, [{"role": "user", "content": PROMPT}]) if chat else tok.encode(PROMPT, add_bos=True)
    assert hf["ids"] == ids  # AutoTokenizer gives elmctl's ids
    model = elmctl.load_pretrained(to)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0, :, :model.config.vocab_size]
    torch.testing.assert_close(hf["logits"], ours, rtol=0, atol=1e-5)

    # greedy generation: `elmctl generate RUN` (the run itself, not the export) prints the same text
    r = _cli(runs, "generate", run, "--prompt", PROMPT, "-n", str(N), "--chat" if chat else "--no-chat",
             "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completion"] == tok.decode(hf["new"]) == hf["text"]


def test_mlx_lm_generate_on_an_export(runs, tmp_path):
    pytest.importorskip("mlx.core")
    to = tmp_path / "out"
    _export(runs, "pt", to)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    r = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(to), "--prompt", PROMPT,
                        "--max-tokens", str(N), "--verbose", "False"],
                       capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    ours = _cli(runs, "generate", "pt", "--prompt", PROMPT, "-n", str(N), "--no-chat", "--format", "json")
    text = json.loads(ours.stdout)["completion"]
    if "\ufffd" not in text:  # mlx's streaming detokenizer renders broken UTF-8 its own way
        assert r.stdout.rstrip("\n") == text


def test_sharded_bf16_export_and_modes(runs, tmp_path):
    import elmctl
    from safetensors import safe_open

    to = tmp_path / "sharded"
    old = os.umask(0o022)
    try:
        info = _export(runs, "pt", to, "--max-shard-size", "200KB", "--dtype", "bf16")
    finally:
        os.umask(old)
    shards = sorted(n for n in info["files"] if n.startswith("model-"))
    assert len(shards) >= 2 and "model.safetensors.index.json" in info["files"]
    assert "model.safetensors" not in info["files"]
    index = json.loads((to / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    with safe_open(str(to / shards[0]), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    # readable by others (not the temp-dir 0700/0600)
    assert stat.S_IMODE(to.stat().st_mode) == 0o755
    assert all(stat.S_IMODE((to / n).stat().st_mode) == 0o644 for n in info["files"])
    # the sharded folder loads in elmctl equal to the one-file fp32 export cast to bf16
    one = tmp_path / "one"
    _export(runs, "pt", one)
    a = elmctl.load_pretrained(to, dtype=torch.bfloat16).state_dict()
    b = elmctl.load_pretrained(one, dtype=torch.bfloat16).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # re-exporting unsharded into the same folder replaces the shards (mlx_lm loads every model*.safetensors)
    again = _export(runs, "pt", to)
    assert not [n for n in again["files"] if n.startswith("model-")]
    assert "model.safetensors.index.json" not in again["files"]


def test_bad_export_options_exit_2(runs, tmp_path):
    for extra in (["--max-shard-size", "lots"], ["--max-shard-size", "-5GB"], ["--dtype", "int8"]):
        r = _cli(runs, "export", "pt", "--to", str(tmp_path / "x"), *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (extra, r.stderr)
        assert not (tmp_path / "x").exists()
