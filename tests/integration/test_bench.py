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


def test_bench_grad_accumulation_counts_every_micro_batch(cli):
    r = cli("bench", "--recipe", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--grad-accumulation", "3",
            "--format", "json", *SMALL)
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["grad_accumulation"] == 3
    assert res["tokens_per_s"] == pytest.approx(3 * 2 * 32 / res["step_time_s"])


def test_bench_two_cpu_processes(cli):
    # The multi-process path (torchrun, gloo all-reduce, rank 0 writes the result) as on 8 GPUs.
    r = cli("bench", "--recipe", "tiny", "--device", "cpu", "--nproc", "2", "--steps", "2", "--warmup", "1",
            "--format", "json", *SMALL)
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["processes"] == 2
    assert res["tokens_per_s"] == pytest.approx(2 * 2 * 32 / res["step_time_s"])
    assert res["tokens_per_s_per_gpu"] == pytest.approx(res["tokens_per_s"] / 2)
    r = cli("bench", "--recipe", "tiny", "--nproc", "2")
    assert r.code == 2 and "--nproc is for --device cpu" in r.err


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


def test_bench_profile_writes_trace_and_splits_the_time(cli, tmp_path):
    prof_dir = tmp_path / "prof"
    r = cli("bench", "--recipe", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--format", "json",
            "--profile", str(prof_dir), *SMALL)
    assert r.code == 0, r.err
    prof = json.loads(r.out)["profile"]
    trace = json.loads((prof_dir / "trace-rank0.json").read_text())
    assert trace["traceEvents"]
    assert prof["trace"] == str(prof_dir / "trace-rank0.json")
    assert sum(prof["categories"].values()) == pytest.approx(1.0)
    # The step's GEMMs, attention and optimizer all show up as such.
    assert prof["categories"]["matmul"] > 0.05
    assert prof["categories"]["attention"] > 0 and prof["categories"]["optimizer"] > 0
    assert prof["device_ms_per_step"] > 0
    assert any(row["name"] == "aten::mm" for row in prof["top"])


def test_bench_profile_table_and_bad_folder(cli, tmp_path):
    r = cli("bench", "--recipe", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
            "--profile", str(tmp_path / "p"), *SMALL)
    assert r.code == 0, r.err
    assert "where the time goes" in r.out and "matmul" in r.out
    a_file = tmp_path / "f"
    a_file.write_text("x")
    r = cli("bench", "--recipe", "tiny", "--device", "cpu", "--profile", str(a_file), *SMALL)
    assert r.code == 2 and "not a folder" in r.err
