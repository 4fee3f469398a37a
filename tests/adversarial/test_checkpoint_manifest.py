"""Issue #10 class 6 (checkpoint part): manifests that are valid JSON of the wrong shape, manifests
that leave out files the checkpoint needs, and checkpoint files that are not plain tensors.

Each case must count as a corrupt checkpoint (fall back to the previous one, as a garbage manifest
already does) or end in one clear refusal, never a traceback and never torch's own
"weights_only=False" advice.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from elmctl.errors import ElmctlError
from elmctl.train import checkpoint as C
from elmctl.train import dist as D


def _save(run, step):
    emb = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
    model = {"token_embeddings.weight": emb, "norm.weight": torch.ones(4)}
    lin = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"step": step, "data": {"next_sequence": 8 * step, "micro": 0}, "rng": [D.rng_state()]}
    return C.save_checkpoint(run, step, model_state=model, optimizer_state=opt.state_dict(), train_state=state,
                             keep=5, meta={"world_size": 1, "global_batch": 8})


def _manifest(run, step):
    return run / "checkpoints" / f"ckpt-{step}" / "manifest.json"


def _rewrite(run, step, edit):
    path = _manifest(run, step)
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def _digest(files):
    from elmctl._files import sha256_json

    return sha256_json(sorted(files.items()))


def _without(data, key):
    data = dict(data)
    data.pop(key)
    return data


def _drop_file(data, name):  # a manifest that is self-consistent but no longer lists `name`
    files = {k: v for k, v in data["files"].items() if k != name}
    return {**data, "files": files, "sha256": _digest(files)}


def _outside(data):  # state.pt named by a path that leaves the folder; checksums all consistent
    files = {k: v for k, v in data["files"].items() if k != "state.pt"}
    files["../ckpt-20/state.pt"] = data["files"]["state.pt"]
    return {**data, "files": files, "sha256": _digest(files)}


WRONG_SHAPES = {
    "a list": lambda d: [d],
    "a string": lambda d: "ckpt",
    "no step": lambda d: _without(d, "step"),
    "step not a number": lambda d: {**d, "step": "twenty"},
    "files a list": lambda d: {**d, "files": list(d["files"].items())},
    "files a string": lambda d: {**d, "files": "model.safetensors"},
    "no files": lambda d: {**_without(d, "files"), "sha256": _digest({})},
    "file outside the folder": lambda d: _outside(d),
    "optimizer.pt not listed": lambda d: _drop_file(d, "optimizer.pt"),
    "state.pt not listed": lambda d: _drop_file(d, "state.pt"),
    "nothing listed": lambda d: {**d, "files": {}, "sha256": _digest({})},
}


@pytest.mark.parametrize("case", list(WRONG_SHAPES))
def test_wrong_shape_manifest_counts_as_corrupt_and_falls_back(tmp_path, case):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    _rewrite(tmp_path, 20, WRONG_SHAPES[case])
    with pytest.raises(C.CheckpointCorrupt) as exc:
        C.verify_checkpoint(tmp_path / "checkpoints" / "ckpt-20")
    assert "ckpt-20" in exc.value.message
    found, warnings = C.find_resumable(tmp_path)
    assert found is not None and found.step == 10
    assert any("ckpt-20" in w for w in warnings) and any("resuming from ckpt-10" in w for w in warnings)


def test_wrong_shape_manifest_everywhere_is_one_clear_error(tmp_path):
    _save(tmp_path, 10)
    _manifest(tmp_path, 10).write_text("[1, 2, 3]")
    with pytest.raises(C.CheckpointCorrupt, match="no usable checkpoint"):
        C.find_resumable(tmp_path)


def test_manifest_step_must_match_the_folder(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    _rewrite(tmp_path, 20, lambda d: {**d, "step": 10})
    found, _ = C.find_resumable(tmp_path)
    assert found.step == 10 and found.path.name == "ckpt-10"


class Payload:  # anything that is not a tensor, number, string or container of them
    def __reduce__(self):
        return (print, ("code ran while loading a checkpoint",))


@pytest.mark.parametrize("fname", ["optimizer.pt", "state.pt"])
def test_non_plain_pickle_is_one_clear_refusal(tmp_path, fname, capsys):
    _save(tmp_path, 10)
    folder = tmp_path / "checkpoints" / "ckpt-10"
    torch.save({"step": 10, "evil": Payload()}, folder / fname)
    _refresh_manifest(folder)  # someone wrote a self-consistent manifest: the sha256 check passes
    info = C.verify_checkpoint(folder)
    with pytest.raises(ElmctlError) as exc:
        C.load_checkpoint_files(info)
    text = str(exc.value)
    assert fname in text and "plain" in text
    assert "weights_only" not in text and "arbitrary code" not in text
    assert "code ran" not in capsys.readouterr().out


def test_not_a_torch_file_is_one_clear_refusal(tmp_path):
    _save(tmp_path, 10)
    folder = tmp_path / "checkpoints" / "ckpt-10"
    (folder / "state.pt").write_bytes(pickle.dumps({"step": 10}))  # a bare pickle, not torch's zip
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    _refresh_manifest(folder)
    info = C.verify_checkpoint(folder)
    with pytest.raises(ElmctlError) as exc:
        C.load_checkpoint_files(info)
    assert "model.safetensors" in str(exc.value) and "weights_only" not in str(exc.value)


def _refresh_manifest(folder):
    from elmctl._files import sha256_file

    m = json.loads((folder / "manifest.json").read_text())
    m["files"] = {f: sha256_file(folder / f) for f in m["files"]}
    m["sha256"] = _digest(m["files"])
    (folder / "manifest.json").write_text(json.dumps(m))


def test_non_plain_checkpoint_is_refused_at_the_cli(cli, tmp_path, monkeypatch):
    """A checkpoint folder from elsewhere (its manifest consistent) given to `elmctl generate`."""
    from elmctl.data.demo import make_demo
    from elmctl.store import Store

    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)
    make_demo(tmp_path / "D", seed=0)
    small = ["--set", "model.context_length=32", "--set", "pretrain.sequences_per_gpu=4",
             "--set", "pretrain.warmup_iterations=2", "--set", "pretrain.max_iterations=40"]
    r = cli("pretrain", "--recipe", "tiny", "--device", "cpu", "--data", tmp_path / "D", "--max-steps", "2",
            "--checkpoint-every", "2", *small, "--name", "p")
    assert r.code == 0, r.err
    with Store() as s:
        folder = Path(s.get_run("p").run_dir) / "checkpoints" / "ckpt-2"
    torch.save({"step": 2, "data": {}, "evil": Payload()}, folder / "state.pt")
    _refresh_manifest(folder)
    r = cli("generate", folder, "--prompt", "hi", "-n", "2")
    assert r.code == 1, r.err
    assert "state.pt is not a plain-tensor file" in r.err and "(it pickles print)" in r.err
    assert "weights_only" not in r.err and "Traceback" not in r.err and "code ran" not in r.out


# --- retention and replacement touch only checkpoint folders elmctl wrote -----------------------------

def _save_tiny(run_dir, step, keep=2):
    import torch

    from elmctl.train.checkpoint import save_checkpoint

    w = {"w": torch.ones(2)}
    return save_checkpoint(run_dir, step=step, model_state=w, optimizer_state={"state": {}, "param_groups": []},
                           train_state={"step": step}, keep=keep)


def test_retention_never_deletes_folders_elmctl_did_not_write(tmp_path):
    from elmctl.train.checkpoint import checkpoint_dir, list_checkpoints

    root = checkpoint_dir(tmp_path)
    root.mkdir(parents=True)
    mine = {}
    for name in ("ckpt-1_000", "ckpt-0007", "ckpt- 3", "ckpt-2"):  # user folders named like checkpoints
        (root / name).mkdir()
        (root / name / "notes.txt").write_text(name)
        mine[name] = name
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "model.safetensors").write_text("precious")
    (root / "ckpt-1").symlink_to(outside, target_is_directory=True)
    for step in (10, 20, 30):
        _save_tiny(tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]  # retention removed ckpt-10 only
    for name, text in mine.items():
        assert (root / name / "notes.txt").read_text() == text
    assert (outside / "model.safetensors").read_text() == "precious" and (root / "ckpt-1").is_symlink()


def test_save_refuses_to_replace_a_foreign_folder_of_the_same_name(tmp_path):
    from elmctl.errors import RuntimeFailure
    from elmctl.train.checkpoint import checkpoint_dir

    root = checkpoint_dir(tmp_path)
    (root / "ckpt-5").mkdir(parents=True)
    (root / "ckpt-5" / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeFailure, match="not an elmctl checkpoint folder"):
        _save_tiny(tmp_path, 5)
    assert (root / "ckpt-5" / "notes.txt").read_text() == "mine"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "ckpt-6.tmp").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RuntimeFailure, match="not an elmctl checkpoint folder"):
        _save_tiny(tmp_path, 6)
    assert outside.is_dir()
    # our own leftover of a crash (a partial ckpt-7.tmp, a complete ckpt-7 that latest never named) is replaced
    (root / "ckpt-7.tmp").mkdir()
    (root / "ckpt-7.tmp" / "optimizer.pt").write_bytes(b"partial")
    assert _save_tiny(tmp_path, 7).path == root / "ckpt-7"
    assert not (root / "ckpt-7.tmp").exists()
