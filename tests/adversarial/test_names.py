"""Issue #10 class 8: run and study names.

A name is 1-64 characters of letters, digits, '.', '_', '-', starting with a letter or digit
(``elmctl.store.NAME_RULE``); `--name ""`, markup, control characters and over-long names are a
usage error at parse time (exit 2, nothing written). Names already in a store (made before the
rule, or by other tools) are shown literally: never parsed as Rich markup, control characters shown
as ``\\xNN``. Before: `--name "[/]x"` was accepted and every later `runs list`/`runs show`/`report`
died with ``rich.errors.MarkupError: closing tag '[/]' ... has nothing to close``.
"""

from __future__ import annotations

import pytest

from adv_util import demo_data, tiny_hf

BAD = ["", "[/]x", "[bold red]shout", "a\x1b[2Jb", "tab\there", "x" * 65, "-starts-with-dash", ".hidden", "a b",
       "slash/name", "caf\u00e9", "rtl\u202eevil", "deadbeef"]
GOOD = ["a", "run-1", "A.b_c-9", "x" * 64, "2024-01-07_lr3e-4", "dead-beef"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("demo") / "D")




@pytest.mark.parametrize("name", GOOD)
def test_check_name_accepts(name):
    from elmctl.store import check_name

    assert check_name(name) == name


@pytest.mark.parametrize("name", BAD, ids=ascii)
def test_check_name_refuses(name):
    from elmctl.errors import UsageError
    from elmctl.store import NAME_RULE, check_name

    with pytest.raises(UsageError) as e:
        check_name(name, "--study")
    assert "--study" in e.value.message and "\x1b" not in str(e.value) and "\u202e" not in str(e.value)
    assert NAME_RULE or e.value.hint


@pytest.mark.parametrize("name", ["", "[/]x", "a\x1b[2Jb", "x" * 65], ids=ascii)
def test_pretrain_refuses_bad_name_before_anything(cli, demo, home, name):
    r = cli("pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo / "pretrain"), "--dry-run", "--name", name)
    assert r.code == 2, r.out + r.err
    assert "--name" in r.err and "Traceback" not in r.err and "\x1b[2J" not in r.err


@pytest.mark.parametrize("cmd,flag", [("tune", "--name"), ("tune-sweep", "--study")])
@pytest.mark.parametrize("name", ["", "[/]x"], ids=ascii)
def test_tune_and_sweep_refuse_bad_names(cli, demo, home, cmd, flag, name):
    r = cli(cmd, "--recipe", "tiny", "--base", "no-such-run", "--data", str(demo), "--device", "cpu", flag, name)
    assert r.code == 2 and flag in r.err, r.err  # the name, not the missing base run, is what is reported


def test_names_in_the_store_render_literally(cli, home):
    """Runs named before the rule existed (or by another tool) list, show, report and cancel cleanly."""
    from elmctl.store import Store

    with Store() as s:
        s.create_run("pretrain", "tiny", {}, name="[/]closing")
        s.create_run("pretrain", "tiny", {}, name="[bold red]loud")
        s.create_run("pretrain", "tiny", {}, name="esc\x1b[2Jape\x07")
    for args in (["runs", "list"], ["runs", "show", "[/]closing"], ["report"], ["runs", "show", "esc\x1b[2Jape\x07"],
                 ["runs", "cancel", "[bold red]loud"]):
        r = cli(*args)
        assert r.code == 0 and "Traceback" not in r.err, (args, r.err)
        text = r.out + r.err
        assert "\x1b" not in text and "\x07" not in text, (args, text)
    assert "[/]closing" in cli("runs", "list").out and "[bold red]loud" in cli("runs", "list").out
    assert "esc\\x1b[2Jape\\x07" in cli("runs", "show", "esc\x1b[2Jape\x07").out


def test_generate_shows_prompt_and_choices_literally(cli, tmp_path):
    folder = tiny_hf(tmp_path / "hf")
    r = cli("generate", str(folder), "-p", "[/]a\x1b[31mred", "-n", "2", "--choice", "[bold]x", "--choice", "[/]")
    assert r.code == 0 and "Traceback" not in r.err, r.err
    assert "[/]a\\x1b[31mred" in r.out and "'[bold]x'" in r.out and "\x1b" not in r.out


def test_the_study_rule_is_for_new_studies_only(cli, demo, home):
    """A new --study must follow the rule; a study an older elmctl made with any name still resumes."""
    import optuna

    from elmctl.store import Store
    from elmctl.sweep.study import open_storage

    args = ("tune-sweep", "--recipe", "tiny", "--base", "no-such-run", "--data", str(demo), "--device", "cpu", "--study")
    r = cli(*args, "my sweep")
    assert r.code == 2 and "--study 'my sweep'" in r.err, r.err
    optuna.create_study(storage=open_storage(Store().url), study_name="my sweep")
    r = cli(*args, "my sweep")
    assert r.code == 2 and "--study" not in r.err and "no-such-run" in r.err, r.err  # got as far as the base
