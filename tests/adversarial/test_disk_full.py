"""Issue #10 class 5: a disk that fills up while a checkpoint is written, and a store on that disk.

No root tricks: the full disk is simulated where the bytes go, by raising ``OSError(ENOSPC)`` from
a write (torch's serializer, safetensors, fsync, the ``latest`` pointer) and by making the SQLite
store refuse writes (``PRAGMA query_only``) or refuse to open read-write (``disk I/O error``, what
SQLite says when it cannot create its ``-shm`` file on a full disk).

Wanted: "disk full writing ckpt-N (M MB free); ckpt-K is the resume point", the partial ``.tmp``
removed, the cause recorded in the store when it can be written, read-only commands working.
"""

from __future__ import annotations

import errno
import io
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elmctl.errors import RuntimeFailure
from elmctl.train import checkpoint as C
from elmctl.train import dist as D

SMALL = ["--set", "model.context_length=32", "--set", "pretrain.sequences_per_gpu=4",
         "--set", "pretrain.warmup_iterations=2", "--set", "pretrain.max_iterations=40"]


def _states(step: int):
    lin = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    lin(torch.randn(2, 64)).sum().backward()
    opt.step()
    state = {"step": step, "data": {"next_sequence": 8 * step, "micro": 0}, "rng": [D.rng_state()]}
    return dict(lin.state_dict()), opt.state_dict(), state


def _save(run, step):
    m, o, t = _states(step)
    return C.save_checkpoint(run, step, model_state=m, optimizer_state=o, train_state=t, keep=3)


class _FullFile(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: the write that crosses it fails with ENOSPC."""

    def __init__(self, path, room: int):
        self._f = open(path, "wb")
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = memoryview(data)
        if len(data) > self.room:
            self._f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self._f.write(data)

    def close(self) -> None:
        self._f.close()
        super().close()


def _assert_clean(run, failed: str, resume: str):
    root = run / "checkpoints"
    assert not list(root.glob("*.tmp")) and not (root / failed).exists()
    assert (root / "latest").read_text().strip() == resume
    found, warnings = C.find_resumable(run)
    assert found.path.name == resume and not warnings


def _assert_message(exc: RuntimeFailure, failed: str, resume: str):
    text = str(exc)
    assert f"disk full writing {failed}" in text and "MB free" in text and f"{resume} is the resume point" in text
    assert "unexpected pos" not in text and "Traceback" not in text


def test_torch_serializer_enospc_is_named_and_cleaned_up(tmp_path, monkeypatch):
    _save(tmp_path, 4)
    _save(tmp_path, 6)
    monkeypatch.setattr(C, "_open_for_write", lambda path: _FullFile(path, 700), raising=False)
    with pytest.raises(RuntimeFailure) as exc:
        _save(tmp_path, 8)
    _assert_message(exc.value, "ckpt-8", "ckpt-6")
    _assert_clean(tmp_path, "ckpt-8", "ckpt-6")


def test_safetensors_enospc_is_named_and_cleaned_up(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    _save(tmp_path, 6)

    def full(tensors, filename, metadata=None):  # what safetensors raises when the disk fills
        Path(filename).write_bytes(b"\0" * 128)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(RuntimeFailure) as exc:
        _save(tmp_path, 8)
    _assert_message(exc.value, "ckpt-8", "ckpt-6")
    _assert_clean(tmp_path, "ckpt-8", "ckpt-6")


@pytest.mark.parametrize("where", ["fsync", "latest"])
def test_enospc_after_the_data_is_named_and_cleaned_up(tmp_path, monkeypatch, where):
    _save(tmp_path, 6)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # fsync reports a full disk on delayed-allocation and network filesystems; `latest` is the last write
    monkeypatch.setattr(C, "_fsync_file" if where == "fsync" else "_point_latest", full)
    with pytest.raises(RuntimeFailure) as exc:
        _save(tmp_path, 8)
    _assert_message(exc.value, "ckpt-8", "ckpt-6")
    monkeypatch.undo()
    _assert_clean(tmp_path, "ckpt-8", "ckpt-6")


def test_first_checkpoint_on_a_full_disk_says_there_is_no_resume_point(tmp_path, monkeypatch):
    def full(*_a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C, "_fsync_file", full)
    with pytest.raises(RuntimeFailure, match="disk full writing ckpt-2.*no earlier checkpoint"):
        _save(tmp_path, 2)
    assert not list((tmp_path / "checkpoints").iterdir())


# -- end to end: `elmctl pretrain` whose checkpoint (and store) hit a full disk ----------------------



@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from elmctl.data.demo import make_demo

    out = tmp_path_factory.mktemp("demo") / "D"
    make_demo(out, seed=0)
    return out


class _Disk:
    """Simulated full disk: checkpoint files from ``from_step`` on fail to fsync; with ``store`` the
    SQLite store refuses writes at the same moment (``PRAGMA query_only``), as when it shares the disk."""

    def __init__(self, monkeypatch, from_step: int, store: bool):
        from elmctl.store import _engine

        self.full = False
        real_fsync = C._fsync_file

        def fsync(path):
            if f"ckpt-{from_step}" in str(path):
                self.full = True
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(path)

        monkeypatch.setattr(C, "_fsync_file", fsync)
        if store:
            real_settings = _engine._install_sqlite_settings
            disk = self

            def settings(engine, **kw):
                real_settings(engine, **kw)

                @_engine.event.listens_for(engine, "begin")
                def _query_only(conn):  # connection-level: holds for the transaction that starts
                    conn.exec_driver_sql(f"PRAGMA query_only = {int(disk.full)}")

            monkeypatch.setattr(_engine, "_install_sqlite_settings", settings)


def _pretrain(cli, demo, *extra):
    return cli("pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), "--checkpoint-every", "2",
               *SMALL, *extra)


def test_pretrain_disk_full_message_cleanup_and_cause_in_store(cli, home, demo, monkeypatch):
    with monkeypatch.context() as m:
        _Disk(m, from_step=6, store=False)
        r = _pretrain(cli, demo, "--max-steps", "8", "--name", "full")
    assert r.code == 1, r.err
    assert "disk full writing ckpt-6" in r.err and "ckpt-4 is the resume point" in r.err and "MB free" in r.err
    assert "Traceback" not in r.err and "Errno" not in r.err
    from elmctl.store import Store

    with Store() as s:
        run = s.get_run("full")
    assert run.status == "failed" and "disk full writing ckpt-6" in run.error and "ckpt-4" in run.error
    ckpts = Path(run.run_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt-2", "ckpt-4", "latest"]
    again = cli("pretrain", "--resume", "full")  # space freed: the resume continues from ckpt-4
    assert again.code == 0, again.err
    with Store() as s:
        assert s.get_run("full").status == "completed" and s.get_run("full").step == 8


def test_pretrain_disk_full_with_the_store_on_it_still_says_disk_full(cli, home, demo, monkeypatch):
    _Disk(monkeypatch, from_step=4, store=True)
    r = _pretrain(cli, demo, "--max-steps", "6", "--name", "both")
    assert r.code == 1, r.err
    assert "disk full writing ckpt-4" in r.err and "ckpt-2 is the resume point" in r.err, r.err
    assert "readonly" not in r.err and "Traceback" not in r.err
    from elmctl.store import Store

    with Store() as s:  # the simulation held: the store could not be told (its pid, ours, is alive)
        assert s.get_run("both").status == "running"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _store_with_a_dead_run(home):
    from elmctl.store import Store

    with Store() as s:
        run = s.create_run("pretrain", "tiny", {}, name="victim", status="running", devices="cpu")
        s.update_run(run.id, pid=_dead_pid())
        s.log_metrics(run.id, 3, {"loss": 2.5})
    return run


def test_runs_list_works_when_the_store_cannot_be_written(cli, home, monkeypatch):
    run = _store_with_a_dead_run(home)
    from elmctl.store import _engine

    real = _engine._install_sqlite_settings

    def read_only(engine, **kw):  # "attempt to write a readonly database" for every write
        real(engine, **kw)
        _engine.event.listens_for(engine, "connect")(lambda c, _r: c.execute("PRAGMA query_only = 1"))

    with monkeypatch.context() as m:
        m.setattr(_engine, "_install_sqlite_settings", read_only)
        r = cli("runs", "list")
        assert r.code == 0, r.err
        assert "victim" in r.out and "failed" in r.out
        shown = cli("runs", "show", "victim")
        assert shown.code == 0, shown.err
        assert "process died" in shown.out
    from elmctl.store import Store

    with Store() as s:  # nothing was written meanwhile; writable again, the next look marks it
        assert s.get_run(run.id).status == "running"


def test_runs_list_works_when_the_store_cannot_be_opened_read_write(cli, home, monkeypatch):
    _store_with_a_dead_run(home)
    real_connect = sqlite3.connect

    def full_disk(database, *a, uri=False, **kw):  # the -shm file cannot be created: disk I/O error
        if "mode=ro" not in str(database):
            raise sqlite3.OperationalError("disk I/O error")
        return real_connect(database, *a, uri=uri, **kw)

    monkeypatch.setattr(sqlite3, "connect", full_disk)
    monkeypatch.setattr(sqlite3.dbapi2, "connect", full_disk)  # what SQLAlchemy's pysqlite calls
    r = cli("runs", "list")
    assert r.code == 0, r.err
    assert "victim" in r.out
