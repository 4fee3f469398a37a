"""Issue #10 class 7 (the `--set` and numeric-option half).

- `--set` values are read as YAML 1.2 core scalars. Before (YAML 1.1): `010` was octal 8, `1:30`
  was sexagesimal 90, `2024-01-01` a date, `no` a boolean.
- A problem that only exists because of a `--set` is blamed on the `--set`. Before:
  `--set pretrain.max_iterations=5` was reported as `.../tiny.yaml:31: pretrain.warmup_iterations: ...`.
- Numeric options refuse zero, negative and absurd values while the command line is parsed (exit 2,
  nothing written). Before: `pretrain --nproc 0/--max-steps -3/--log-every 0` planned a run,
  `--nproc -1` died with ``ValueError: max() arg is an empty sequence``, `data prepare -j 0` created
  its output folder, `generate -t nan` died with ``RuntimeError: probability tensor contains ...``
  and `--seed 2**70` with ``ValueError: Overflow when unpacking long long``.
"""

from __future__ import annotations

import pytest

from adv_util import demo_data, one_torch_thread, tiny_hf


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("demo") / "D")




@pytest.mark.parametrize("raw, value", [
    ("010", 10), ("-007", -7), ("+5", 5), ("0o17", 15), ("0x1F", 31), ("1_000", 1000),
    ("1:30", "1:30"), ("2024-01-01", "2024-01-01"), ("no", "no"), ("On", "On"),
    ("true", True), ("False", False), ("~", None), ("1e-3", 1e-3), ("08", 8), ("0b11", "0b11"),
])
def test_set_values_are_yaml_1_2(raw, value):
    from elmctl.config.loader import parse_overrides

    got = parse_overrides([f"k={raw}"])["k"]
    assert got == value and type(got) is type(value)


def test_set_decimal_reaches_the_recipe():
    from elmctl.config import load_recipe

    r = load_recipe("tiny", ["pretrain.max_iterations=0100", "pretrain.warmup_iterations=010"])
    assert (r.pretrain.max_iterations, r.pretrain.warmup_iterations) == (100, 10)


@pytest.mark.parametrize("override, field", [
    ("pretrain.max_iterations=5", "pretrain.warmup_iterations"),  # cross-field: reported at the other field
    ("instruct.max_length=16", "instruct.max_prompt_length"),
    ("pretrain.max_iterations=1:30", "pretrain.max_iterations"),
])
def test_a_bad_set_is_blamed_on_the_set(cli, override, field):
    r = cli("recipe", "show", "tiny", "--set", override)
    assert r.code == 2, r.err
    line = next(ln for ln in r.err.splitlines() if field in ln)
    assert line.strip().startswith("--set:") and "tiny.yaml" not in line, r.err


def test_a_problem_of_the_file_stays_with_the_file(recipe_file, cli):
    path = recipe_file(lambda d: d["pretrain"].update(warmup_iterations=500))
    r = cli("recipe", "show", str(path), "--set", "pretrain.max_lr=1e-3")
    assert r.code == 2 and f"{path}:" in r.err and "--set:" not in r.err, r.err


PRETRAIN_BAD = [
    ("--nproc", "0"), ("--nproc", "-1"), ("--nproc", "100000"),
    ("--max-steps", "0"), ("--max-steps", "-3"), ("--max-steps", str(10**30)),
    ("--checkpoint-every", "0"), ("--checkpoint-every", "-1"), ("--eval-every", "0"), ("--eval-every", "-5"),
    ("--log-every", "0"), ("--log-every", "-5"), ("--log-every", str(2**41)),
]


@pytest.mark.parametrize("flag, value", PRETRAIN_BAD)
def test_pretrain_numeric_options_refused_at_parse(cli, demo, home, flag, value):
    r = cli("pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo / "pretrain"), "--dry-run", flag, value)
    assert r.code == 2, r.out + r.err
    assert flag in r.err and "Traceback" not in r.err


@pytest.mark.parametrize("cmd, flag, value", [
    ("tune", "--epochs", "100000"), ("tune", "--nproc", "0"), ("tune", "--gpu-mem", "0"),
    ("tune-sweep", "--parallel", "0"), ("tune-sweep", "--parallel", "-3"), ("tune-sweep", "--gpus-per-trial", "0"),
    ("tune-sweep", "--max-retries", str(10**20)),
])
def test_tune_numeric_options_refused_before_the_base_is_looked_up(cli, demo, home, cmd, flag, value):
    r = cli(cmd, "--recipe", "tiny", "--base", "no-such-run", "--data", str(demo), "--device", "cpu", flag, value)
    assert r.code == 2 and flag in r.err, r.err  # the option, not the missing base run


@pytest.mark.parametrize("flag, value", [("--nproc", "100000"), ("--steps", str(10**12)), ("--seq-len", str(10**9))])
def test_bench_refuses_absurd_values(cli, flag, value):
    # an unknown recipe would be reported if the option got through
    r = cli("bench", "--recipe", "no-such-recipe", "--device", "cpu", flag, value)
    assert r.code == 2 and flag in r.err, r.err


@pytest.mark.parametrize("value", ["0", "-1", "100000"])
def test_data_prepare_workers_refused_before_writing(cli, demo, tmp_path, value):
    out = tmp_path / "prepared"
    r = cli("data", "prepare", str(demo / "raw" / "corpus.jsonl"), "--tokenizer", "byte", "--out", str(out), "-j", value)
    assert r.code == 2 and ("-j" in r.err or "--workers" in r.err), r.err
    assert not out.exists()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    with one_torch_thread():
        yield tiny_hf(tmp_path_factory.mktemp("g") / "hf")


@pytest.mark.parametrize("args", [
    ("-t", "nan"), ("-t", "inf"), ("-t", "-0.5"), ("-t", "1", "--seed", str(2**70)), ("-t", "1", "--seed", str(-(2**70))),
], ids=" ".join)
def test_generate_refuses_bad_numbers(cli, hf_folder, args):
    r = cli("generate", str(hf_folder), "-p", "hi", "-n", "3", *args)
    assert r.code == 2 and "Traceback" not in r.err, r.err
    assert args[-2] in r.err


def test_generate_tiny_temperature_is_greedy(cli, hf_folder):
    greedy = cli("generate", str(hf_folder), "-p", "hi", "-n", "4", "--format", "json")
    cold = cli("generate", str(hf_folder), "-p", "hi", "-n", "4", "-t", "1e-45", "--seed", "0", "--format", "json")
    assert greedy.code == cold.code == 0, cold.err
    import json

    assert json.loads(cold.out)["completion"] == json.loads(greedy.out)["completion"]


def test_generate_on_cuda_without_a_gpu(cli, hf_folder):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    r = cli("generate", str(hf_folder), "-p", "hi", "-n", "2", "--device", "cuda")
    assert r.code == 2 and "--device cuda" in r.err, r.err
