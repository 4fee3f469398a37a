"""`elmctl bench` on the CPU: real training step, JSON interface, clear errors."""

from __future__ import annotations

import json

import pytest

SMALL = ["--set", "model.context_length=32", "--set", "pretrain.sequences_per_gpu=2"]


def test_bench_cpu_json(cli):
    r = cli("bench", "--recipe", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--format", "json", *SMALL)
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["recipe"] == "tiny" and res["device"] == "cpu" and res["processes"] == 1
    assert res["seq_len"] == 32 and res["micro_batch"] == 2
    assert res["tokens_per_s"] > 0
    assert res["tokens_per_s"] == pytest.approx(2 * 32 / res["step_time_s"])
    assert res["mfu"] is None  # no GPU peak on the CPU
    # The real step trains: the loss moves away from its starting value.
    assert res["loss_last"] != res["loss_first"]


def test_bench_cpu_table(cli):
    r = cli("bench", "--recipe", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", *SMALL)
    assert r.code == 0, r.err
    assert "tokens/s" in r.out and "MFU" in r.out


def test_bench_without_gpu_is_a_clear_error(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    r = cli("bench", "--recipe", "tiny", "--steps", "1")
    assert r.code == 2
    assert "no GPU found" in r.err and "--device cpu" in r.err
    assert "Traceback" not in r.err


def test_bench_bad_checkpointing_value(cli):
    r = cli("bench", "--recipe", "tiny", "--device", "cpu", "--checkpointing", "maybe")
    assert r.code == 2 and "--checkpointing" in r.err
