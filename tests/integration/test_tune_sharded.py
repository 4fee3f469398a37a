"""`elmctl tune --nproc 2 --device cpu` with `instruct.sharding` (FSDP2 on gloo), end to end.

Sharded DPO (policy and frozen reference under FSDP2) must train like the 2-process DDP run,
write full checkpoints under OpenELM's names, and resume after Ctrl-C with the losses of an
uninterrupted sharded run. 2-layer tiny model, 32 preference pairs: 4 steps per epoch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain_util import ctrl_c_once_training, losses, run_cli, store

EPOCHS = 4  # 16 steps; the loss is logged (and a stop agreed on) every 4
SETS = ["--set", "model.num_layers=2"]
SHARDED = ["--set", "instruct.sharding=fsdp"]


@pytest.fixture(scope="module")
def home(tmp_path_factory, tune_assets_factory):
    root = tune_assets_factory(tmp_path_factory.mktemp("tune_sharded"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ELMCTL_HOME", str(root / "home"))
        mp.delenv("ELMCTL_STORE", raising=False)
        mp.setenv("ELMCTL_LOCK_DIR", str(root / "locks"))
        mp.setenv("OMP_NUM_THREADS", "1")
        yield root


def _args(home: Path, name: str, *extra: str) -> list[str]:
    return ["tune", "--recipe", "tiny", *SETS, "--base", str(home / "base"), "--data", str(home / "prefs"),
            "--device", "cpu", "--nproc", "2", "--epochs", str(EPOCHS), "--name", name, *extra]


def _log(run: str) -> str:
    with store() as s:
        return (Path(s.get_run(run).run_dir) / "train.log").read_text()


@pytest.fixture(scope="module")
def refs(home) -> dict[str, dict[int, float]]:
    """Uninterrupted 2-process runs: DDP (sharding none) and FSDP2 (sharding fsdp)."""
    for name, extra in (("ddp", []), ("fsdp", SHARDED)):
        res = run_cli(*_args(home, name, *extra))
        assert res.returncode == 0, res.stderr + res.stdout
    return {"ddp": losses("ddp", "train_loss"), "fsdp": losses("fsdp", "train_loss")}


def test_sharded_tune_trains_like_ddp_and_writes_full_checkpoints(refs, home):
    ddp, fsdp = refs["ddp"], refs["fsdp"]
    assert sorted(ddp) == sorted(fsdp) == list(range(1, 4 * EPOCHS + 1))
    # fp32 on CPU: only the summation order differs (reduce-scatter of gradient shards, per-shard
    # norms for clipping); measured: at most 1 float32 ulp apart, most steps bit-equal.
    for step in ddp:
        assert abs(fsdp[step] - ddp[step]) <= 1e-5 * max(1.0, abs(ddp[step])), step
    assert "FSDP2 (instruct.sharding fsdp)" in _log("fsdp") and "and the reference model sharded" in _log("fsdp")
    assert "FSDP2" not in _log("ddp")
    from safetensors.torch import load_file

    with store() as s:
        assert s.get_run("fsdp").status == "completed"
        ckpts = {n: s.checkpoints(s.get_run(n).id)[-1].path for n in ("ddp", "fsdp")}
        assert [c.step for c in s.checkpoints(s.get_run("fsdp").id)][-1] == 4 * EPOCHS
        evals = {n: s.latest_metrics(s.get_run(n).id) for n in ("ddp", "fsdp")}
    assert evals["fsdp"]["eval_loss"] == pytest.approx(evals["ddp"]["eval_loss"], rel=1e-5)
    full, ref = (load_file(str(Path(ckpts[n]) / "model.safetensors")) for n in ("fsdp", "ddp"))
    assert sorted(full) == sorted(ref) and "layers.1.ffn.proj_2.weight" in full  # not shards or DTensors
    for name, t in ref.items():
        torch.testing.assert_close(full[name], t, rtol=1e-4, atol=1e-5, msg=name)
    optim = torch.load(Path(ckpts["fsdp"]) / "optimizer.pt", weights_only=True)
    assert optim["state"] and all(not type(v).__name__.startswith("DTensor")
                                  for st in optim["state"].values() for v in st.values())


def test_sharded_tune_ctrl_c_then_resume_matches_uninterrupted(refs, home):
    code, out, err = ctrl_c_once_training(_args(home, "fcc", *SHARDED), "fcc", key="train_loss")
    assert code == 130, out + err
    assert "Traceback" not in out + err
    with store() as s:
        run = s.get_run("fcc")
        assert run.status == "cancelled" and 0 < run.step < 4 * EPOCHS, (run.status, run.step)
        assert s.checkpoints(run.id)[-1].step == run.step  # the sharded state, gathered at the stop
    resumed = run_cli(*_args(home, "fcc2", *SHARDED, "--resume-from", run.id))
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert f"step {run.step})" in resumed.stderr and f"training steps {run.step + 1}..{4 * EPOCHS}" in _log("fcc2")
    got, want = losses("fcc2", "train_loss"), refs["fsdp"]
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]  # bit-identical


def test_sharded_checkpoint_does_not_continue_an_unsharded_run(home):
    from elmctl.train.tune.resume import compare, trial_identity

    from elmctl.config import load_recipe

    rec = load_recipe("tiny", ["instruct.sharding=fsdp"])
    ident = {k: trial_identity(rec, lr=1e-3, epochs=1, loss="sigmoid", base_path="b", data_dir=home / "prefs",
                               precompute_ref=False, on_gpu=False, sharded=k) for k in (False, True)}
    topo = {"world_size": 2}
    meta = {"kind": "tune", "resume": ident[True], "world_size": 2}
    assert compare(meta, ident[True], topo) == []
    assert compare(meta, ident[False], topo) == ["sharding: checkpoint 'fsdp2', this trial 'none'"]
    old = {"kind": "tune", "resume": {k: v for k, v in ident[False].items() if k != "sharding"}}  # before the key
    assert compare(old, ident[False], topo) == [] and compare(old, ident[True], topo)
