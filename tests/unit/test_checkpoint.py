"""Checkpoints: atomic write, `latest` moved last, retention, corruption detection and fallback."""

from __future__ import annotations

import json

import pytest
import torch

from elmctl.train import checkpoint as C
from elmctl.train import dist as D


def _states(seed: int):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(6, 4, generator=g)
    model = {"token_embeddings.weight": emb, "lm_head.weight": emb, "norm.weight": torch.ones(4)}  # tied
    lin = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3, betas=(0.9, 0.95))
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    train_state = {"step": seed, "data": {"next_sequence": 8 * seed, "micro": 0}, "rng": [D.rng_state()]}
    return model, opt.state_dict(), train_state


def _save(run, step, keep=3, final=False):
    m, o, t = _states(step)
    return C.save_checkpoint(run, step, model_state=m, optimizer_state=o, train_state=t, keep=keep, final=final,
                             meta={"world_size": 1, "global_batch": 8})


def test_roundtrip_weights_only_and_tied(tmp_path):
    info = _save(tmp_path, 10)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "ckpt-10"
    found, warnings = C.find_resumable(tmp_path)
    assert found.step == 10 and found.sha256 == info.sha256 and not warnings
    model, opt, state = C.load_checkpoint_files(found)  # torch.load(weights_only=True) inside
    ref, ref_opt, _ = _states(10)
    torch.testing.assert_close(model["lm_head.weight"], ref["token_embeddings.weight"])
    assert state["data"] == {"next_sequence": 80, "micro": 0}
    assert opt["param_groups"][0]["betas"] == (0.9, 0.95)
    D.set_rng_state(state["rng"][0])  # RNG state restores from plain types
    manifest = json.loads((found.path / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "state.pt"}


def test_retention_keeps_last_k_and_final(tmp_path):
    _save(tmp_path, 1, keep=2, final=True)
    for step in (2, 3, 4, 5):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [1, 4, 5]


def test_interrupted_write_never_becomes_latest(tmp_path, monkeypatch):
    _save(tmp_path, 10)

    def boom(path, obj):  # the write fails after model.safetensors was written
        raise OSError("disk full")

    monkeypatch.setattr(C, "_write_pt", boom)
    with pytest.raises(OSError):
        _save(tmp_path, 20)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "ckpt-10"
    assert not (root / "ckpt-20.tmp").exists() and not (root / "ckpt-20").exists()  # the partial one is removed
    found, _ = C.find_resumable(tmp_path)
    assert found.step == 10
    monkeypatch.undo()
    (root / "ckpt-20.tmp").mkdir()  # what a crash (kill -9) mid-write leaves behind
    (root / "ckpt-20.tmp" / "model.safetensors").write_bytes(b"partial")
    _save(tmp_path, 20)  # a later save of the same step replaces the stale temp folder
    assert C.find_resumable(tmp_path)[0].step == 20 and not (root / "ckpt-20.tmp").exists()


def test_corruption_detected_and_falls_back(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    target = tmp_path / "checkpoints" / "ckpt-20" / "optimizer.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(C.CheckpointCorrupt, match="optimizer.pt"):
        C.verify_checkpoint(target.parent)
    found, warnings = C.find_resumable(tmp_path)
    assert found.step == 10
    assert any("corrupted" in w for w in warnings) and any("ckpt-10" in w for w in warnings)
    # Nothing usable at all: a clear error, not a silent fresh start.
    (tmp_path / "checkpoints" / "ckpt-10" / "manifest.json").write_text("{")
    with pytest.raises(C.CheckpointCorrupt, match="no usable checkpoint"):
        C.find_resumable(tmp_path)


def test_store_checksum_mismatch_is_detected(tmp_path):
    _save(tmp_path, 10)
    with pytest.raises(C.CheckpointCorrupt, match="recorded"):
        C.find_resumable(tmp_path, expected={10: "0" * 64})
