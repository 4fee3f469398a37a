"""Issue #10 class 1: elmctl deletes or overwrites only what it wrote itself.

`data prepare --out DIR` deletes only the files its own previous manifest lists; a non-empty folder
without an elmctl manifest is refused (exit 2) unless --force, and even then the files already
there are left alone. `export --to DIR` writes only into a new/empty folder or a previous export.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from elmctl.errors import UsageError

DOCS = [f"document {i}: " + "the quick brown fox jumps. " * (1 + i % 5) for i in range(40)]
PAIRS = [{"prompt": f"question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(24)]
# the examples: names that merely look like elmctl's shard names
USER_FILES = ["test-results.csv", "train-notes.txt", "train-old.bin", "val-set.bin", "test-old.bin"]
LOOSE = ["--min-chars", "0", "--min-tokens", "0", "--val-fraction", "0.1", "--workers", "1"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    return {"pretrain": write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in DOCS]),
            "preference": write_jsonl(tmp_path / "prefs.jsonl", PAIRS)}


def prepare_args(kind: str, src: Path, out: Path, *extra: str) -> list[str]:
    args = ["data", "prepare", str(src), "-t", "byte", "--out", str(out), "--kind", kind, *extra]
    return args + (LOOSE if kind == "pretrain" else [])


def snapshot(folder: Path, names) -> dict[str, str]:
    """name -> sha256 of the content (following links), or the link target / 'dir' for other entries."""
    out = {}
    for n in names:
        p = folder / n
        if p.is_symlink():
            out[n] = "link->" + os.readlink(p)
        elif p.is_dir():
            out[n] = "dir:" + ",".join(sorted(x.name for x in p.iterdir()))
        else:
            out[n] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def user_folder(folder: Path, names=USER_FILES) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_text(f"precious {n}\n")
    return snapshot(folder, names)


@pytest.mark.parametrize("kind", ["pretrain", "preference"])
def test_folder_of_user_files_is_refused_and_untouched(cli, inputs, tmp_path, kind):
    out = tmp_path / "out"
    before = user_folder(out)
    r = cli(*prepare_args(kind, inputs[kind], out))
    assert r.code == 2, r.out + r.err
    assert "--force" in r.err and "manifest" in r.err
    assert "Traceback" not in r.err
    assert snapshot(out, USER_FILES) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(USER_FILES)  # nothing written either


@pytest.mark.parametrize("kind", ["pretrain", "preference"])
def test_force_writes_beside_user_files_and_rebuilds_keep_them(cli, inputs, tmp_path, kind):
    out = tmp_path / "out"
    before = user_folder(out)
    r = cli(*prepare_args(kind, inputs[kind], out, "--force", "--format", "json"))
    assert r.code == 0, r.err
    assert json.loads(r.out)["status"] == "built"
    assert snapshot(out, USER_FILES) == before
    ours = {f["name"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert set(p.name for p in out.iterdir()) == set(USER_FILES) | ours | {"manifest.json"}
    # re-run, nothing changed: a no-op, no --force needed (the folder is ours now)
    r = cli(*prepare_args(kind, inputs[kind], out, "--format", "json"))
    assert r.code == 0 and json.loads(r.out)["status"] == "up_to_date", r.err
    # changed input: rebuilt without --force, the user's files still there
    rows = [{"text": d} for d in DOCS[:-3]] if kind == "pretrain" else PAIRS[:-3]
    write_jsonl(inputs[kind], rows)
    r = cli(*prepare_args(kind, inputs[kind], out, "--format", "json"))
    assert r.code == 0 and json.loads(r.out)["status"] == "built", r.err
    assert snapshot(out, USER_FILES) == before
    # --force on an up-to-date folder rebuilds, still leaving them alone
    r = cli(*prepare_args(kind, inputs[kind], out, "--force", "--format", "json"))
    assert r.code == 0 and json.loads(r.out)["status"] == "built", r.err
    assert snapshot(out, USER_FILES) == before


def test_rebuild_removes_exactly_the_old_manifests_files(inputs, tmp_path):
    from elmctl.data.prepare import prepare_pretrain

    out = tmp_path / "out"
    loose = dict(min_chars=0, min_tokens=0, val_fraction=0.1, workers=1)
    first = prepare_pretrain([inputs["pretrain"]], out, "byte", shard_tokens=300, **loose).manifest
    old_names = {f["name"] for f in first["files"]}
    assert len(old_names) > 3
    before = user_folder(out, ["train-00099.bin.bak", "notes.txt", "val-00000.bin.orig", "val-old.bin"])
    second = prepare_pretrain([inputs["pretrain"]], out, "byte", shard_tokens=100_000, **loose).manifest
    new_names = {f["name"] for f in second["files"]}
    assert new_names == {"train-00000.bin", "val-00000.bin"}
    assert set(p.name for p in out.iterdir()) == new_names | set(before) | {"manifest.json"}
    assert snapshot(out, before) == before


@pytest.mark.parametrize("kind", ["pretrain", "preference"])
def test_subfolders_and_links_named_like_shards(cli, inputs, tmp_path, kind):
    out = tmp_path / "out"
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"user data " * 100)
    (out / "val-set.bin").mkdir(parents=True)
    (out / "val-set.bin" / "keep.txt").write_text("keep")
    (out / "train-00000.bin").symlink_to(victim)  # exactly an output name, but not written by elmctl
    names = ["val-set.bin", "train-00000.bin"]
    before = snapshot(out, names)
    victim_sum = hashlib.sha256(victim.read_bytes()).hexdigest()
    for extra in ([], ["--force"]):
        r = cli(*prepare_args(kind, inputs[kind], out, *extra))
        assert r.code == 2, r.out + r.err
        assert "Traceback" not in r.err
        assert snapshot(out, names) == before
        assert hashlib.sha256(victim.read_bytes()).hexdigest() == victim_sum
    assert "train-00000.bin" in " ".join(r.err.split())  # with --force: names the file in the way
    (out / "train-00000.bin").unlink()  # the user moves their link away: --force writes beside the folder
    r = cli(*prepare_args(kind, inputs[kind], out, "--force"))
    assert r.code == 0, r.err
    assert snapshot(out, ["val-set.bin"]) == {"val-set.bin": before["val-set.bin"]}


@pytest.mark.parametrize("kind", ["pretrain", "preference"])
def test_a_manifest_json_that_is_not_ours_is_never_overwritten(cli, inputs, tmp_path, kind):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"project": "my web app", "version": 3}\n')
    before = snapshot(out, ["manifest.json"])
    for extra in ([], ["--force"]):
        r = cli(*prepare_args(kind, inputs[kind], out, *extra))
        assert r.code == 2, r.out + r.err
        assert "manifest.json" in r.err and "Traceback" not in r.err
        assert snapshot(out, ["manifest.json"]) == before
        assert [p.name for p in out.iterdir()] == ["manifest.json"]


def test_a_tampered_manifest_cannot_delete_outside_or_foreign_files(inputs, tmp_path):
    from elmctl.data.prepare import prepare_pretrain

    out = tmp_path / "data" / "out"
    loose = dict(min_chars=0, min_tokens=0, val_fraction=0.1, workers=1)
    prepare_pretrain([inputs["pretrain"]], out, "byte", **loose)
    outside = tmp_path / "data" / "thesis.txt"
    outside.write_text("four years of work")
    inside = user_folder(out, ["notes.txt", "train-old.bin"])
    m = json.loads((out / "manifest.json").read_text())
    m["files"] += [{"name": "../thesis.txt", "split": "train", "bytes": 1}, {"name": "notes.txt", "split": "val", "bytes": 1},
                   {"name": "train-old.bin", "split": "train", "bytes": 1},
                   {"name": str(outside), "split": "train", "bytes": 1}]
    (out / "manifest.json").write_text(json.dumps(m))
    prepare_pretrain([inputs["pretrain"]], out, "byte", shard_tokens=1000, **loose)  # a rebuild
    assert outside.read_text() == "four years of work"
    assert snapshot(out, ["notes.txt", "train-old.bin"]) == inside


def test_other_kind_of_elmctl_data_is_not_replaced_without_force(cli, inputs, tmp_path):
    out = tmp_path / "out"
    assert cli(*prepare_args("pretrain", inputs["pretrain"], out)).code == 0
    pretrain_manifest = (out / "manifest.json").read_text()
    r = cli(*prepare_args("preference", inputs["preference"], out))
    assert r.code == 2 and "pretrain" in r.err and "--force" in r.err, r.out + r.err
    assert (out / "manifest.json").read_text() == pretrain_manifest and (out / "val-00000.bin").is_file()
    r = cli(*prepare_args("preference", inputs["preference"], out, "--force"))
    assert r.code == 0, r.err
    assert json.loads((out / "manifest.json").read_text())["kind"] == "preference"
    assert not (out / "val-00000.bin").exists()  # the old pretrain shards were ours: replaced


def killed_midway(prepare, *args, after_tokens: int, **kwargs) -> None:
    """Run ``prepare`` in a forked child that dies (os._exit: no clean-up runs) once it has written
    ``after_tokens`` tokens: what kill -9 or a power cut leaves behind."""
    import multiprocessing as mp

    def die(done, total, tokens):
        if tokens >= after_tokens:
            os._exit(9)

    child = mp.get_context("fork").Process(target=prepare, args=args, kwargs={**kwargs, "progress": die})
    child.start()
    child.join(60)
    assert child.exitcode == 9


def test_crashed_build_is_resumed_without_force_and_spares_user_files(inputs, tmp_path):
    """A hard crash leaves partial shards and no manifest; the next run cleans up only those."""
    from elmctl.data.prepare import prepare_pretrain
    from elmctl.data.shards import TokenDataset

    out = tmp_path / "out"
    before = user_folder(out, USER_FILES)
    loose = dict(min_chars=0, min_tokens=0, val_fraction=0.1, workers=1, batch_bytes=256)
    # first the very first build is killed, then a rebuild (new shard size) of a finished folder
    for shard_tokens, force in ((200, True), (300, False)):
        killed_midway(prepare_pretrain, [inputs["pretrain"]], out, "byte", force=force, after_tokens=700,
                      shard_tokens=shard_tokens, **loose)
        assert list(out.glob("train-0000*.bin")) and list(out.glob("*.bin.tmp"))
        assert not (out / "manifest.json").exists()
        r = prepare_pretrain([inputs["pretrain"]], out, "byte", shard_tokens=shard_tokens, **loose)  # no --force needed
        assert not r.up_to_date
        assert snapshot(out, USER_FILES) == before
        ours = {f["name"] for f in r.manifest["files"]}
        assert set(p.name for p in out.iterdir()) == set(USER_FILES) | ours | {"manifest.json"}
        assert TokenDataset(out).num_tokens == r.manifest["splits"]["train"]["tokens"]


# --- export -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with one tiny checkpoint, made directly (no training): what `export` reads."""
    import torch

    from elmctl.config import load_recipe
    from elmctl.model import OpenELM
    from elmctl.train.checkpoint import save_checkpoint

    recipe = load_recipe("tiny")
    root = tmp_path_factory.mktemp("run")
    (root / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json")))
    (root / "options.json").write_text(json.dumps({"run_id": "r1"}))
    torch.manual_seed(0)
    model = OpenELM(recipe.model)
    save_checkpoint(root, 2, model_state=model.state_dict(), optimizer_state={}, train_state={"step": 2, "data": {}}, keep=2)
    return root


def export(cli, run_dir, to, *extra):
    return cli("export", str(run_dir), "--to", str(to), "--format", "json", *extra)


def test_export_into_a_folder_with_other_files_is_refused(cli, run_dir, tmp_path):
    to = tmp_path / "hf"
    names = ["notes.md", "model-final.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    before = user_folder(to, names)
    r = export(cli, run_dir, to)
    assert r.code == 2, r.out + r.err
    assert "not an elmctl export" in " ".join(r.err.split()) and "Traceback" not in r.err
    assert snapshot(to, names) == before and sorted(p.name for p in to.iterdir()) == sorted(names)


def test_export_over_someone_elses_hf_folder_is_refused(cli, run_dir, tmp_path):
    to = tmp_path / "OpenELM-270M"  # e.g. Apple's download: config.json + model.safetensors
    names = ["config.json", "model.safetensors", "generation_config.json"]
    before = user_folder(to, names)
    r = export(cli, run_dir, to)
    assert r.code == 2, r.out + r.err
    assert snapshot(to, names) == before


def test_export_again_into_a_previous_export_and_extra_files_there(cli, run_dir, tmp_path):
    to = tmp_path / "hf"
    r = export(cli, run_dir, to)
    assert r.code == 0, r.err
    first = snapshot(to, [p.name for p in to.iterdir()])
    r = export(cli, run_dir, to, "--dtype", "bfloat16")  # our own previous export: replaced
    assert r.code == 0, r.err
    assert set(p.name for p in to.iterdir()) == set(first)
    (to / "README.md").write_text("my notes")  # now it holds something that is not ours
    r = export(cli, run_dir, to)
    assert r.code == 2 and "README.md" in r.err, r.out + r.err
    assert (to / "README.md").read_text() == "my notes"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(cli, run_dir, empty).code == 0
    # an export written before elmctl_export.json listed its files is still recognised as ours
    legacy = json.loads((empty / "elmctl_export.json").read_text())
    del legacy["files"]
    for name in os.listdir(empty):  # such exports held Apple's two files (+ the tokenizer file) only
        if name not in ("config.json", "model.safetensors", "elmctl_export.json"):
            (empty / name).unlink()
    legacy["tokenizer"] = None
    (empty / "elmctl_export.json").write_text(json.dumps(legacy))
    assert export(cli, run_dir, empty).code == 0
    assert "files" in json.loads((empty / "elmctl_export.json").read_text())


def test_save_pretrained_never_deletes_unrelated_safetensors(tmp_path):
    import elmctl

    model = elmctl.build_model("tiny")
    (tmp_path / "model-final.safetensors").write_bytes(b"my other model")
    with pytest.raises(UsageError, match="model-final.safetensors"):
        elmctl.save_pretrained(model, tmp_path)
    assert (tmp_path / "model-final.safetensors").read_bytes() == b"my other model"
    # a new folder gets the mode any new folder gets (it was owner-only: mkdtemp's 0700)
    umask = os.umask(0)
    os.umask(umask)
    elmctl.save_pretrained(model, tmp_path / "new")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o777 & ~umask
