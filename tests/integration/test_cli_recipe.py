"""`elmctl recipe list|show|validate|diff|schema` through the real CLI entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FACTS = {"270m": 271_527_168, "450m": 457_179_136, "1_1b": 1_079_891_456, "3b": 3_036_647_424}
HF_270M_HEADS = [12, 12, 12, 12, 12, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20]
HF_270M_KV = [3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5]


@pytest.mark.parametrize("rid", list(FACTS))
def test_show_json_params_and_heads(cli, rid):
    res = cli("recipe", "show", rid, "--format", "json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["derived"]["params_total"] == FACTS[rid]
    assert set(data) >= {"id", "model", "pretrain", "instruct", "provenance", "derived"}
    if rid == "270m":
        assert [L["query_heads"] for L in data["derived"]["layers"]] == HF_270M_HEADS
        assert [L["kv_heads"] for L in data["derived"]["layers"]] == HF_270M_KV


def test_show_table_and_layers(cli):
    res = cli("recipe", "show", "450m")
    assert res.code == 0 and "457,179,136" in res.out and "Table 9" in res.out and "Table 10" in res.out
    assert "Per-layer shapes" not in res.out
    res = cli("recipe", "show", "1_1b", "--layers")
    assert "Per-layer shapes" in res.out and res.out.count("4608") >= 2


def test_show_yaml(cli):
    res = cli("recipe", "show", "tiny", "--format", "yaml")
    assert res.code == 0
    data = yaml.safe_load(res.out)
    assert data["id"] == "tiny" and data["derived"]["params_total"] > 0


@pytest.mark.parametrize("gpus", [1, 8, 16])
def test_show_gpus_plan_keeps_global_batch(cli, gpus):
    data = json.loads(cli("recipe", "show", "270m", "--gpus", str(gpus), "-f", "json").out)
    plan = data["derived"]["plan"]
    assert plan["micro_batch"] * plan["grad_accumulation"] * plan["gpus"] == 2048
    assert plan["fits"] is True
    table = cli("recipe", "show", "270m", "--gpus", str(gpus)).out
    assert "= 2048 seq (recipe 2048)" in table and "fits" in table


def test_show_small_gpu_memory(cli):
    big = json.loads(cli("recipe", "show", "1_1b", "--gpus", "8", "-f", "json").out)["derived"]["plan"]
    small = json.loads(cli("recipe", "show", "1_1b", "--gpus", "8", "--gpu-mem", "24", "-f", "json").out)["derived"]["plan"]
    assert small["micro_batch"] < big["micro_batch"]
    res = cli("recipe", "show", "3b", "--gpus", "1", "--gpu-mem", "8")
    assert res.code == 0 and "does not fit" in res.out


def test_show_bad_gpu_type(cli):
    res = cli("recipe", "show", "tiny", "--gpu", "V100")
    assert res.code == 2 and "unknown --gpu" in res.err


def test_show_set_override(cli):
    data = json.loads(cli("recipe", "show", "450m", "--set", "pretrain.max_lr=1e-3", "-f", "json").out)
    assert data["pretrain"]["max_lr"] == 1e-3
    res = cli("recipe", "show", "450m", "--set", "pretrain.max_lr=5")
    assert res.code == 2 and "--set: pretrain.max_lr" in res.err and "Traceback" not in res.err
    res = cli("recipe", "show", "450m", "-s", "pretrain.max_lrr=1e-3")
    assert res.code == 2 and "did you mean 'max_lr'" in res.err


def test_unknown_recipe_id(cli):
    res = cli("recipe", "show", "45m")
    assert res.code == 2 and "unknown recipe '45m'" in res.err and "did you mean '450m'" in res.err


def test_list_formats(cli):
    res = cli("recipe", "list", "--format", "json")
    rows = json.loads(res.out)
    assert {r["id"]: r["params"] for r in rows if r["id"] in FACTS} == FACTS
    table = cli("recipe", "list").out
    for rid in ("270m", "450m", "1_1b", "3b", "tiny"):
        assert rid in table
    assert yaml.safe_load(cli("recipe", "list", "-f", "yaml").out)[0]["id"] == "270m"


def test_list_fits_narrow_terminal():
    # A narrow terminal gets one column per recipe rather than cells squeezed to "…".
    code = (
        "from rich.console import Console; import elmctl.cli._common as c; "
        "c.console = lambda stderr=False: Console(width=70, force_terminal=False); "
        "from elmctl.cli.main import main; main(['recipe', 'list'])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True).stdout
    assert "…" not in out and "3.04B" in out and "sigmoid" in out
    assert max(len(line) for line in out.splitlines()) <= 70


def test_validate_several_files(cli, recipe_file, tmp_path):
    good = recipe_file(name="good.yaml")
    bad = recipe_file(lambda d: (d["model"].update(model_dim=100), d["pretrain"].update(adam_betas=[0.9, 2])), name="bad.yaml")
    broken = recipe_file(text="id: x\nmodel: [1,\n", name="broken.yaml")
    res = cli("recipe", "validate", good, bad, broken)
    assert res.code == 2
    assert "ok" in res.out and "tiny" in res.out
    assert f"{bad}:" in res.err and "model.model_dim" in res.err and "pretrain.adam_betas" in res.err
    assert f"{broken}:3" in res.err and "not valid YAML" in res.err
    assert "3 problems" in res.err and "Traceback" not in res.err
    assert cli("recipe", "validate", *sorted(str(p) for p in (REPO / "recipes").glob("*.yaml"))).code == 0


def test_diff(cli):
    res = cli("recipe", "diff", "270m", "450m")
    assert res.code == 0 and "model.num_layers" in res.out and "params_total" in res.out
    rows = {r["field"]: (r["a"], r["b"]) for r in json.loads(cli("recipe", "diff", "270m", "450m", "-f", "json").out)}
    assert rows["model.num_layers"] == (16, 20)
    assert rows["derived.params_total"] == (FACTS["270m"], FACTS["450m"])
    assert "model.head_dim" not in rows


def test_schema_is_json_schema(cli):
    schema = json.loads(cli("recipe", "schema").out)
    assert schema["type"] == "object" and schema["title"] == "Recipe"
    assert {"id", "model", "pretrain", "instruct", "provenance"} <= set(schema["properties"])
    assert {"ModelConfig", "PretrainConfig", "InstructConfig", "Provenance"} <= set(schema["$defs"])
    assert schema["$defs"]["ModelConfig"]["additionalProperties"] is False
    refs = []

    def walk(node):
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    assert refs and all(r.removeprefix("#/$defs/") in schema["$defs"] for r in refs)
    model = schema["$defs"]["ModelConfig"]["properties"]
    assert model["num_layers"]["type"] == "integer" and model["num_layers"]["minimum"] == 1
    assert model["head_dim"]["description"]
    jsonschema = pytest.importorskip("jsonschema")  # full metaschema check where it is installed
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((REPO / "recipes" / "openelm-270m.yaml").read_text()), schema)


def test_help_texts_have_examples(cli):
    res = cli("--help")
    assert res.code == 0 and "Example:" in res.out and "recipe" in res.out
    res = cli("recipe", "--help")
    assert res.code == 0 and "list" in res.out and "validate" in res.out
    for cmd in ("list", "show", "validate", "diff", "schema"):
        res = cli("recipe", cmd, "--help")
        assert res.code == 0 and "Example:" in res.out, cmd


def test_every_group_help_has_example(cli):
    import typer.main

    from elmctl.cli.main import get_app

    group = typer.main.get_command(get_app())
    assert {"recipe", "data", "pretrain", "bench", "runs", "tune", "tune-sweep", "report", "demo"} <= set(group.commands)
    for name, sub in group.commands.items():
        res = cli(name, "--help")
        assert res.code == 0 and res.out.strip(), name
        if hasattr(sub, "commands"):
            for cname in sub.commands:
                out = cli(name, cname, "--help").out
                assert "Example" in out, f"{name} {cname}"
        else:
            assert "Example" in res.out, name


def _elmctl() -> str:
    return str(Path(sys.executable).with_name("elmctl"))


def test_shell_completion():
    env = {**os.environ, "_ELMCTL_COMPLETE": "complete_bash", "COMP_WORDS": "elmctl rec", "COMP_CWORD": "1"}
    out = subprocess.run([_elmctl()], env=env, capture_output=True, text=True, timeout=60)
    assert "recipe" in out.stdout.split()
    env.update(COMP_WORDS="elmctl recipe show 4", COMP_CWORD="3")
    out = subprocess.run([_elmctl()], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["450m"]
    # Typer finds the shell among the parent processes (shellingham), as it does for a user typing this
    # in bash: run it from a bash (a compound command, so bash forks rather than execs). Without that,
    # a test run whose parent shell has exited (nohup, CI agents) gets "Shell  not supported".
    script = subprocess.run(["bash", "-c", f"'{_elmctl()}' --show-completion; true"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "SHELL": "/bin/bash"})
    assert script.returncode == 0 and "_ELMCTL_COMPLETE" in script.stdout and "complete" in script.stdout


def test_unknown_commands_and_bad_flag_values_exit_2_without_traceback(cli):
    for args in (["nosuch"], ["recipe", "shw"], ["recipe", "show", "450m", "--gpus", "x"]):
        res = cli(*args)
        assert res.code == 2, args
        assert "Traceback" not in res.err and "Error" in res.err, args
