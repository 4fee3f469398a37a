"""Property-based: random option values through the CLI's parser end in a result or a clear error.

Hypothesis drives `elmctl` (its ``main()``, in this process) for pretrain, tune, tune-sweep, bench,
generate and recipe show with random values for their options: numbers of any size and sign,
nan/inf, unicode and Rich markup in strings, random `--set key=value`. Nothing trains: pretrain
runs with ``--dry-run``; tune and tune-sweep name a base run that does not exist (so every check of
their options has to happen first); bench's worker process is replaced by a stub that writes a
result; generate decodes from a tiny random model. Property: no traceback, no exception out of
``main()``, exit status 0 or 2.

Before (issue #10): `pretrain --nproc -1` raised ``ValueError: max() arg is an empty sequence``,
`generate -t nan` ``RuntimeError: probability tensor contains either inf, nan or element < 0``,
`generate --seed 2**70` ``ValueError: Overflow when unpacking long long``, `generate -p "[/]"`
``rich.errors.MarkupError``, `generate --device cuda` on a CPU-only torch ``AssertionError``.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adv_util import demo_data, one_torch_thread, tiny_hf

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))

MARKUP = ["[/]", "[bold]", "[red]x[/red]", "\x1b[2J", "\u202e", "", " ", "-", "--", "0", "nan", "inf", "-inf",
          "1e309", "１２", "0x10", "010", "1:30", "~", "null", "[", "]", "\\", "=", "a=b", "'", '"', "\n"]
texts = st.one_of(st.sampled_from(MARKUP), st.text(max_size=12))
ints = st.one_of(st.integers(-3, 40), st.integers(-(10**30), 10**30),
                 st.sampled_from([0, -1, 2**31, 2**40, 2**41, 2**63, 2**64, -(2**63) - 1])).map(str)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["nan", "inf", "-inf", "1e-45", "1e-300", "0", "-0.0", "1e309", "0.5", "3"]))
SET_KEYS = ["pretrain.max_iterations", "pretrain.warmup_iterations", "pretrain.max_lr", "pretrain.sequences_per_gpu",
            "model.context_length", "model.num_layers", "model.vocab_size", "instruct.lr", "instruct.epochs",
            "instruct.lr_grid", "instruct.max_length", "id", "pretrain", "model.qkv_multipliers", "nope.x", ""]
formats = st.sampled_from(["table", "json", "yaml", "md", "[/]"])
set_items = st.builds(lambda k, v, sep: f"{k}{sep}{v}", st.one_of(st.sampled_from(SET_KEYS), texts),
                      st.one_of(texts, ints, floats, st.sampled_from(["[1, 2]", "{a: 1}", "&a [*a]", "!!float", "1_000"])),
                      st.sampled_from(["=", "=", ""]))


def options(table: dict) -> st.SearchStrategy[list[str]]:
    """A random subset of ``table`` (flag -> value strategy, None for a flag without value), in random order."""

    @st.composite
    def draw(d):
        flags = d(st.lists(st.sampled_from(sorted(table)), max_size=4, unique=True))
        out: list[str] = []
        for flag in flags:
            out += [flag] if table[flag] is None else [flag, d(table[flag])]
        return out

    return draw()


def run(args: list[str]) -> tuple[int, str]:
    from elmctl.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])  # an exception here fails the test with its traceback
    text = out.getvalue() + err.getvalue()
    assert isinstance(code, int) and code in (0, 2), (args, code, text[-2000:])
    assert "Traceback" not in text, (args, text[-2000:])
    return code, text


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("demo") / "D")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    with one_torch_thread():
        yield tiny_hf(tmp_path_factory.mktemp("m") / "hf")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ELMCTL_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)
    monkeypatch.delenv("ELMCTL_DEBUG", raising=False)


PRETRAIN = {"--nproc": ints, "--max-steps": ints, "--micro-batch": ints, "--checkpoint-every": ints,
            "--eval-every": ints, "--log-every": ints, "--name": texts, "--set": set_items, "--gpus": texts,
            "--nnodes": ints, "--node-rank": ints, "--rdzv-endpoint": texts, "--format": formats, "--no-compile": None}


@SETTINGS
@given(opts=options(PRETRAIN))
@example(opts=["--nproc", "-1"])
@example(opts=["--set", "pretrain.max_iterations=010"])
def test_pretrain_dry_run(demo, opts):
    run(["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", demo / "pretrain", "--dry-run", *opts])


TUNE = {"--lr": floats, "--epochs": ints, "--loss": texts, "--name": texts, "--set": set_items, "--gpus": texts,
        "--device": st.sampled_from(["cpu", "cuda", "gpu", "tpu", ""]), "--nproc": ints, "--resume-from": texts,
        "--format": formats, "--precompute-ref": None}


@SETTINGS
@given(opts=options(TUNE))
def test_tune(demo, opts):
    code, _ = run(["tune", "--recipe", "tiny", "--base", "no-such-run", "--data", demo, *opts])
    assert code == 2


SWEEP = {"--lrs": st.one_of(texts, st.lists(floats, max_size=3).map(",".join)),
         "--epochs": st.one_of(texts, st.lists(ints, max_size=3).map(",".join)), "--parallel": ints,
         "--gpus-per-trial": ints, "--max-retries": ints, "--n-trials": ints,
         "--sampler": st.sampled_from(["grid", "tpe", "random", ""]), "--metric": texts, "--pruner": texts,
         "--study": texts, "--set": set_items, "--loss": texts, "--gpus": texts}


@SETTINGS
@given(opts=options(SWEEP))
def test_tune_sweep(demo, opts):
    code, _ = run(["tune-sweep", "--recipe", "tiny", "--base", "no-such-run", "--data", demo, "--device", "cpu", *opts])
    assert code == 2


BENCH = {"--nproc": ints, "--steps": ints, "--warmup": ints, "--micro-batch": ints, "--grad-accumulation": ints,
         "--seq-len": ints, "--checkpointing": texts, "--set": set_items, "--format": formats, "--no-compile": None}

_BENCH_RESULT = {"recipe": "tiny", "processes": 1, "device": "cpu", "micro_batch": 8, "seq_len": 256,
                 "grad_accumulation": 1, "precision": "fp32", "compiled": False, "activation_checkpointing": False,
                 "attention_backend": "auto", "step_time_s": 0.01, "tokens_per_s": 1000.0, "tokens_per_s_per_gpu": 1000.0,
                 "mfu": None, "peak_memory_gib": None, "compile_time_s": 0.1, "loss_first": 5.6, "loss_last": 5.5}


def _fake_bench(cmd, *a, **k):
    """Stands in for the benchmark worker process: writes a result where --json-out says."""
    with open(cmd[cmd.index("--json-out") + 1], "w") as f:
        json.dump(_BENCH_RESULT, f)
    return subprocess.CompletedProcess(cmd, 0, "", "")


@SETTINGS
@given(opts=options(BENCH))
@example(opts=["--nproc", "100000"])
def test_bench(monkeypatch, opts):
    import elmctl.cli.bench as bench

    monkeypatch.setattr(bench.subprocess, "run", _fake_bench)
    run(["bench", "--recipe", "tiny", "--device", "cpu", *opts])


GENERATE = {"-n": st.one_of(st.integers(-2, 12).map(str), ints), "-t": floats, "--top-k": ints, "--seed": ints,
            "--chat": None, "--no-chat": None, "--tokenizer": st.one_of(st.just("byte"), texts),
            "--device": st.sampled_from(["cpu", "cuda", "mps", ""]), "--choice": texts, "--format": formats}


@SETTINGS
@given(prompt=texts, opts=options(GENERATE))
@example(prompt="hi", opts=["-t", "nan"])
@example(prompt="hi", opts=["-t", "1", "--seed", str(2**70)])
@example(prompt="[/]", opts=["--choice", "[/]"])
@example(prompt="hi", opts=["--device", "cuda"])
def test_generate(hf, prompt, opts):
    if "--device" in opts and opts[opts.index("--device") + 1] == "cuda":
        import torch

        if torch.cuda.is_available():  # would run on the GPU: fine, but not what this CPU test is about
            return
    run(["generate", hf, "-p", prompt, *opts])


RECIPE_SHOW = {"--gpus": ints, "--gpu-mem": floats, "--gpu": texts, "--mfu": floats, "--layers": None,
               "--set": set_items, "--format": formats}


@SETTINGS
@given(recipe=st.one_of(st.sampled_from(["tiny", "270m", "3b", "1b"]), texts), opts=options(RECIPE_SHOW))
def test_recipe_show(recipe, opts):
    run(["recipe", "show", recipe, *opts])


def test_the_stub_is_what_bench_runs():
    """Guard for test_bench: it patches the process bench really starts (else it would benchmark)."""
    import elmctl.cli.bench as bench

    assert bench.subprocess is subprocess and sys.modules["subprocess"] is subprocess
