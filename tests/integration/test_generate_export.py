"""`elmctl generate` and `elmctl export` on real tiny runs (a 4-step pretrain run and a 1-epoch DPO run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # builds real runs first (~30-60 s on 2 busy cores)

Q = "What is 12 + 30?"


def elmctl(*args: str, env: dict) -> str:
    p = subprocess.run([sys.executable, "-m", "elmctl", *args], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, f"elmctl {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    url = f"sqlite:///{root / 'elmctl.db'}"
    env = {**os.environ, "ELMCTL_HOME": str(root)}
    env.pop("ELMCTL_STORE", None)
    elmctl("data", "demo", "--out", str(root / "data"), "--docs", "300", "--pairs", "16", "--test-pairs", "8", env=env)
    elmctl("pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(root / "data"), "--name", "pre",
           "--set", "pretrain.max_iterations=4", "--set", "pretrain.warmup_iterations=1",
           "--set", "pretrain.sequences_per_gpu=2", "--checkpoint-every", "4", "--store", url, env=env)
    elmctl("tune", "--recipe", "tiny", "--base", "pre", "--data", str(root / "data"), "--device", "cpu", "--lr", "1e-3",
           "--epochs", "1", "--name", "tuned", "--precompute-ref", "--store", url, "--format", "json", env=env)
    return url, root


def _gen(cli, *args):
    r = cli("generate", *args, "--format", "json")
    assert r.code == 0, r.err
    return json.loads(r.out)


def test_generate_from_runs_picks_the_template_by_run_kind(cli, runs):
    url = runs[0]
    pre = _gen(cli, "pre", "--prompt", Q, "-n", "6", "--store", url)
    assert pre["run_kind"] == "pretrain" and pre["chat"] is False and pre["step"] == 4 and pre["tokenizer"] == "byte"
    assert 1 <= pre["new_tokens"] <= 6 and pre["prompt_tokens"] == len(Q.encode()) + 1  # BOS + the bytes
    assert _gen(cli, "pre", "--prompt", Q, "-n", "6", "--store", url)["completion"] == pre["completion"]  # greedy
    tuned = _gen(cli, "tuned", "--prompt", Q, "-n", "6", "--store", url)
    assert tuned["run_kind"] == "tune" and tuned["chat"] is True and tuned["prompt_tokens"] > len(Q.encode()) + 20
    plain = _gen(cli, "tuned", "--prompt", Q, "-n", "6", "--no-chat", "--store", url)
    assert plain["chat"] is False and plain["prompt_tokens"] == len(Q.encode()) + 1
    a = _gen(cli, "tuned", "--prompt", Q, "-n", "12", "-t", "1.0", "--top-k", "20", "--seed", "3", "--store", url)
    b = _gen(cli, "tuned", "--prompt", Q, "-n", "12", "-t", "1.0", "--top-k", "20", "--seed", "3", "--store", url)
    assert a["completion"] == b["completion"]


def test_table_output_and_run_folder(cli, runs):
    url, root = runs
    r = cli("generate", "pre", "--prompt", Q, "-n", "4", "--store", url)
    assert r.code == 0 and "prompt: What is 12 + 30?" in r.out and "output:" in r.out and "plain prompt" in r.out
    folder = next(p for p in (root / "runs").iterdir() if (p / "options.json").is_file()
                  and "base_kind" not in json.loads((p / "options.json").read_text()))
    by_folder = _gen(cli, str(folder), "--prompt", Q, "-n", "6")
    assert by_folder["completion"] == _gen(cli, "pre", "--prompt", Q, "-n", "6", "--store", url)["completion"]


def test_export_loads_with_load_pretrained_and_generates_the_same(cli, runs, tmp_path):
    import torch

    import elmctl
    from elmctl.train.weights import load_model, resolve_source

    url = runs[0]
    r = cli("export", "tuned", "--to", str(tmp_path / "hf"), "--store", url, "--format", "json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert {"config.json", "model.safetensors", "elmctl_export.json"} <= set(info["files"])
    assert info["run_kind"] == "tune" and info["tokenizer"] == "byte" and info["chat_template"] == "openelm-zephyr-v1"
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "openelm" and cfg["vocab_size"] == 259 and cfg["num_transformer_layers"] == 4
    hf = elmctl.load_pretrained(tmp_path / "hf").eval()
    ref = load_model(resolve_source("tuned", url))
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids)[..., :259], ref(ids)[..., :259])
    from_hf = _gen(cli, str(tmp_path / "hf"), "--prompt", Q, "-n", "8")
    from_run = _gen(cli, "tuned", "--prompt", Q, "-n", "8", "--store", url)
    assert from_hf["chat"] is True and from_hf["completion"] == from_run["completion"]
    r = cli("export", str(tmp_path / "hf"), "--to", str(tmp_path / "again"))
    assert r.code == 2 and "already an HF folder" in r.err


def test_errors(cli, runs, tmp_path):
    url = runs[0]
    r = cli("generate", "nope", "--prompt", Q, "--store", url)
    assert r.code == 2 and "no run 'nope'" in r.err
    r = cli("generate", "pre", "--prompt", "x" * 300, "--store", url)
    assert r.code == 2 and "context" in r.err
    r = cli("generate", "pre", "--prompt", Q, "--max-new-tokens", "0", "--store", url)
    assert r.code == 2
    r = cli("generate", "pre", "--prompt", Q, "--store", f"sqlite:///{tmp_path / 'none.db'}")
    assert r.code == 2 and not (tmp_path / "none.db").exists()
    (tmp_path / "empty").mkdir()
    r = cli("generate", str(tmp_path / "empty"), "--prompt", Q)
    assert r.code == 2 and "holds no model" in r.err


def test_choices_are_scored_like_dpo_and_the_most_likely_is_the_pick(cli, runs):
    import torch

    from elmctl.train.weights import load_model, load_source_tokenizer, resolve_source
    from elmctl.data.chat import encode_chat

    url = runs[0]
    res = _gen(cli, "tuned", "--prompt", Q, "-n", "2", "--choice", "42", "--choice", "18", "--store", url)
    by_text = {c["text"]: c for c in res["choices"]}
    assert set(by_text) == {"42", "18"} and by_text["42"]["tokens"] == 3  # '4' '2' EOS
    assert res["pick"] == max(res["choices"], key=lambda c: c["logprob"])["text"]
    # by hand: sum of log-softmax over the answer's tokens and EOS, after the chat prompt
    src = resolve_source("tuned", url)
    model, tok = load_model(src), None
    tok = load_source_tokenizer(src, None, model.config.vocab_size)
    prompt = encode_chat(tok, [{"role": "user", "content": Q}])
    for text, row in by_text.items():
        ans = tok.encode(text) + [tok.eos_id]
        ids = torch.tensor(prompt + ans)[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1]).float(), -1)[0]
        want = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(ans))
        assert row["logprob"] == pytest.approx(want, abs=1e-3)
    r = cli("generate", "tuned", "--prompt", Q, "-n", "2", "--choice", "42", "--choice", "18", "--store", url)
    assert r.code == 0 and "<- pick" in r.out and "choice '42'" in r.out
    r = cli("generate", "tuned", "--prompt", Q, "--choice", "", "--store", url)
    assert r.code == 2 and "--choice is empty" in r.err
