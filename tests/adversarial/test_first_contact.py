"""Issue #10 class 11: first contact.

Before:
- after `elmctl demo`, the command the README suggests next, `elmctl report`, said
  "no store at .../experiments/elmctl.db: nothing has been recorded there yet" (the demo records
  into its own folder's store), and `elmctl runs list` silently *created* an empty
  experiments/elmctl.db and said "no runs";
- a bad `elmctl tune --base` was found only inside the run: an HF folder without weights left a
  ``failed`` tune run in the store, and its message was printed twice ("failed: UsageError: ..."
  from the run's log lines, then "error: ..."); a corrupted checkpoint folder as base crashed with a
  ``SafetensorError`` traceback; a base run whose checkpoints are all corrupted exited 1 with
  "the run cannot be resumed" (a hint about resuming, for an input mistake);
- a run that fails in-process (tune, pretrain --resume of a corrupted run) printed its error
  twice, e.g. "failed: CheckpointCorrupt: no usable checkpoint: ..." and "error: no usable checkpoint: ...".

Now report and runs list fall back to the newest demo's store when the default store does not
exist (and say where they looked), read-only commands never create a store file, a bad base is
an input error (exit 2) found before any run is recorded, and every error is printed once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from adv_util import demo_data, tiny_hf

SMALL = ["--set", "model.num_layers=2", "--set", "model.context_length=32", "--set", "pretrain.sequences_per_gpu=4",
         "--set", "pretrain.warmup_iterations=1"]


def _demo_store(name: str) -> Path:
    """A store where `elmctl demo` (default --out) puts it, holding one pretrain run called ``name``."""
    from elmctl.demo import demo_config
    from elmctl.store import Store

    cfg = demo_config()  # the real default: <ELMCTL_HOME>/demo-<timestamp>/elmctl.db
    with Store(cfg.store_url) as s:
        run = s.create_run("pretrain", "tiny", {}, name=name, devices="cpu")
        s.log_metrics(run.id, 1, {"loss": 5.0})
        s.set_status(run.id, "completed")
    return Path(cfg.store_url.removeprefix("sqlite:///"))


def test_report_and_runs_list_find_the_demo(cli, home):
    first = _demo_store("demo-pretrain-old")
    time.sleep(1.1)  # demo folders are named by the second
    latest = _demo_store("demo-pretrain")
    os.utime(first, (time.time() + 60, time.time() + 60))  # newest folder wins, not the newest file
    assert latest.parent.parent == home and latest.parent.name.startswith("demo-")
    r = cli("report")
    assert r.code == 0, r.err
    assert "demo-pretrain" in r.out and "demo-pretrain-old" not in r.out
    assert str(latest) in r.err and str(home / "elmctl.db") in r.err  # says where it looked and what it shows
    r = cli("runs", "list")
    assert r.code == 0, r.err
    assert "demo-pretrain" in r.out and str(latest) in r.err
    assert not (home / "elmctl.db").exists()
    # an explicit store is never second-guessed
    r = cli("report", "--store", str(home / "elmctl.db"))
    assert r.code == 2 and "no store" in r.err


def test_read_only_commands_never_create_a_store(cli, home):
    db = home / "elmctl.db"
    r = cli("runs", "list")
    assert r.code == 0 and "no store" in (r.out + r.err) and not db.exists()
    r = cli("runs", "list", "--format", "json")
    assert r.code == 0 and r.out.strip() == "[]" and not db.exists()
    for args in (("runs", "show", "abcd"), ("runs", "logs", "abcd"), ("report",)):
        r = cli(*args)
        assert r.code == 2 and "no store" in r.err, args
        assert not db.exists() and not home.exists(), args


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fc")
    data = demo_data(root / "data")
    good = tiny_hf(root / "hf")
    (root / "noweights").mkdir()
    (root / "noweights" / "config.json").write_bytes((good / "config.json").read_bytes())
    return root, data


def _tune(cli, base, data, *extra):
    return cli("tune", "--recipe", "tiny", "--base", str(base), "--data", str(data), "--device", "cpu", *extra)


def _runs() -> list:
    from elmctl.store import Store

    with Store() as s:
        return s.list_runs(limit=None)


def test_bad_base_is_an_input_error_before_any_run(cli, home, assets):
    root, data = assets
    r = _tune(cli, root / "noweights", data)
    assert r.code == 2, r.err
    assert r.err.count("holds neither") == 1 and "failed:" not in r.err
    assert _runs() == []  # no `failed` tune run for a mistyped base


def test_corrupted_base_checkpoint_or_run_is_an_input_error(cli, home, assets):
    root, data = assets
    r = cli("pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(data), "--max-steps", "2",
            "--checkpoint-every", "2", "--eval-every", "2", *SMALL, "--name", "pre")
    assert r.code == 0, r.err
    (pre,) = _runs()
    ckpt = Path(pre.run_dir) / "checkpoints" / "ckpt-2"
    with open(ckpt / "model.safetensors", "ab") as f:
        f.write(b"garbage")
    for base in (ckpt, "pre", pre.run_dir):  # the checkpoint folder, the run by name, the run folder
        r = _tune(cli, base, data, "--set", "model.num_layers=2")
        assert r.code == 2, (base, r.code, r.err)
        assert "Traceback" not in r.err and "--base" in r.err and "corrupt" in r.err, r.err
        assert "cannot be resumed" not in r.err
    assert [x.kind for x in _runs()] == ["pretrain"]
    # the same corruption met by `pretrain --resume`: said once, not twice
    r = cli("pretrain", "--resume", "pre", "--max-steps", "4")
    assert r.code != 0
    assert (r.out + r.err).count("no usable checkpoint") == 1, r.out + r.err


def test_a_tune_run_failing_in_process_prints_its_error_once(cli, home, assets, monkeypatch):
    root, data = assets
    monkeypatch.setenv("ELMCTL_INJECT_FAILURE", "1")
    r = _tune(cli, root / "hf", data)
    assert r.code == 1
    assert (r.out + r.err).count("injected failure") == 1, r.out + r.err
