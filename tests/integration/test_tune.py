"""`elmctl tune` end to end on CPU with a 2-layer tiny model and 32 preference pairs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

SETS = ["--set", "model.num_layers=2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import elmctl
    from elmctl.data.demo import _write_jsonl, make_pairs
    from elmctl.data.preference import prepare_preference

    root = tmp_path_factory.mktemp("tune")
    torch.manual_seed(0)
    elmctl.save_pretrained(elmctl.build_model("tiny", num_layers=2), root / "base")
    elmctl.save_pretrained(elmctl.build_model("tiny", num_layers=3), root / "base3")
    _write_jsonl(root / "prefs.jsonl", make_pairs(32, 8))
    prepare_preference([root / "prefs.jsonl"], root / "prefs", "byte", recipe="tiny")
    _write_jsonl(root / "train_only.jsonl", [{k: v for k, v in r.items() if k != "split"} for r in make_pairs(32, 0)])
    prepare_preference([root / "train_only.jsonl"], root / "train_only", "byte", recipe="tiny", test_fraction=0.0)
    return root


@pytest.fixture
def tune(cli, assets, tmp_path, monkeypatch):
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)

    def run(*args, base=None, data=None):
        r = cli("tune", "--recipe", "tiny", *SETS, "--base", str(base or assets / "base"), "--data",
                str(data or assets / "prefs"), "--device", "cpu", "--format", "json", *args)
        return r, (json.loads(r.out) if r.code == 0 else None)

    return run


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dpo_run_changes_every_parameter_logs_epochs_and_checkpoints(tune, assets):
    from safetensors.torch import load_file

    from elmctl.store import Store

    base_sha = _sha(assets / "base" / "model.safetensors")
    r, out = tune("--epochs", "2", "--lr", "3e-3", "--name", "dpo1")
    assert r.code == 0, r.err
    assert out["status"] == "completed" and out["metrics"]["epoch"] == 2
    store = Store()
    rows = {}
    for m in store.metrics(out["run_id"]):
        rows.setdefault(m.step, {})[m.key] = m.value
    evals = sorted((v["epoch"], v) for v in rows.values() if "epoch" in v)
    assert [e for e, _ in evals] == [1, 2]
    for _, v in evals:  # the keys the sweep driver reads, at the same step as `epoch`
        assert {"eval_loss", "reward_accuracy", "reward_margin"} <= set(v)
        assert 0 <= v["reward_accuracy"] <= 1
    assert any("train_loss" in v and "lr" in v for v in rows.values())
    ckpts = store.checkpoints(out["run_id"])
    assert [c.meta["epoch"] for c in ckpts] == [1, 2] and ckpts[-1].meta["final"]
    # every trainable tensor moved away from the base; the base (the reference) is untouched
    import elmctl

    base = elmctl.load_pretrained(assets / "base")
    tuned = load_file(str(Path(ckpts[-1].path) / "model.safetensors"))
    names = [n for n, _ in base.named_parameters()]
    assert len(names) == 2 * 8 + 2  # embedding + final norm + 8 per layer (attn/ffn/q/k norms, qkv, out, proj_1, proj_2)
    for name, p in base.named_parameters():
        n = min(p.shape[0], tuned[name].shape[0])
        assert not torch.equal(tuned[name][:n], p.detach()[:n]), name
    assert _sha(assets / "base" / "model.safetensors") == base_sha

    # the ranking metrics: the base's is computed by hand over the held-out pairs; the tuned one's
    # from the final weights the same way
    from elmctl.data.preference import collate_pairs, load_pairs
    from elmctl.train.dpo import sequence_logps, split_pair_logps

    test = load_pairs(assets / "prefs", "test")
    batch = collate_pairs(test, pad_id=259)

    def ranks_right(model) -> float:
        with torch.no_grad():
            c, r = split_pair_logps(sequence_logps(model(batch["input_ids"]), batch["labels"]))
        return float((c > r).float().mean())

    tuned_model = elmctl.build_model("tiny", num_layers=2)
    tuned_model.load_state_dict(tuned)
    for _, v in evals:
        assert v["base_preference_accuracy"] == pytest.approx(ranks_right(base), abs=1e-9)
    assert evals[-1][1]["preference_accuracy"] == pytest.approx(ranks_right(tuned_model), abs=1e-9)


def test_base_as_run_id_hinge_and_precompute_ref_match(tune):
    r, first = tune("--epochs", "1", "--name", "start")
    assert r.code == 0, r.err
    # a run id as --base: its newest checkpoint; precomputed reference log-probs give the same numbers
    r, a = tune("--epochs", "1", "--loss", "hinge", base="start")
    assert r.code == 0, r.err
    r, b = tune("--epochs", "1", "--loss", "hinge", "--precompute-ref", base="start")
    assert r.code == 0, r.err
    for k in ("eval_loss", "reward_accuracy", "reward_margin"):
        assert a["metrics"][k] == pytest.approx(b["metrics"][k], abs=1e-4), k


def test_sft_run(tune):
    r, out = tune("--epochs", "1", "--loss", "sft", "--lr", "3e-3")
    assert r.code == 0, r.err
    # eval_loss of an SFT run is the answer NLL: a per-token cross-entropy, far above DPO's log 2
    assert out["metrics"]["eval_loss"] > 1.0 and "reward_accuracy" in out["metrics"]


def test_errors_before_anything_starts(tune, assets, tmp_path):
    from elmctl.store import Store

    r, _ = tune(base=assets / "base3")
    assert r.code == 2 and "does not match recipe tiny" in r.err
    r, _ = tune(data=assets / "train_only")
    assert r.code == 2 and "no held-out (test) pairs" in r.err
    r, _ = tune("--loss", "ipo")
    assert r.code == 2 and "sigmoid, hinge or sft" in r.err
    r, _ = tune(base="no-such-run")
    assert r.code == 2
    assert Store().list_runs() == []  # nothing was recorded
