"""Preference/SFT pairs: chat template ids, truncation, layouts, splits, collate masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from elmctl.cli.main import main
from elmctl.data.chat import encode_chat, format_prompt
from elmctl.data.preference import collate_pairs, collate_sft, load_pairs, prepare_preference, truncate_pair
from elmctl.data.tokenizers import ByteTokenizer
from elmctl.errors import UsageError

TOK = ByteTokenizer()


def b(text: str) -> list[int]:
    return [x + 3 for x in text.encode()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_template_exact_ids():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    ids = encode_chat(TOK, msgs)
    expected = [1] + b("<|system|>\nBe brief.") + [2] + b("\n<|user|>\nHi?") + [2] + b("\n<|assistant|>\n")
    assert ids == expected
    assert format_prompt(msgs) == "<|system|>\nBe brief.</s>\n<|user|>\nHi?</s>\n<|assistant|>\n"
    # a multi-turn conversation without the generation prompt ends on the last turn's EOS
    conv = msgs[1:] + [{"role": "assistant", "content": "Yes."}]
    assert encode_chat(TOK, conv, add_generation_prompt=False) == (
        [1] + b("<|user|>\nHi?") + [2] + b("\n<|assistant|>\nYes.") + [2]
    )
    assert encode_chat(TOK, [], add_bos=False) == b("<|assistant|>\n")
    with pytest.raises(UsageError, match="unknown role"):
        encode_chat(TOK, [{"role": "bot", "content": "x"}])


def test_truncation_like_trl():
    prompt = [1] + list(range(10, 30))  # 21 tokens, BOS first
    chosen, rejected = list(range(40, 50)) + [2], [60, 61, 2]
    p, c, r, cut = truncate_pair(prompt, chosen, rejected, max_length=40, max_prompt_length=8, bos_id=1, eos_id=2)
    assert not cut and (p, c, r) == (prompt, chosen, rejected)  # 21 + 11 <= 40
    p, c, r, cut = truncate_pair(prompt, chosen, rejected, max_length=25, max_prompt_length=8, bos_id=1, eos_id=2)
    assert cut and p == [1] + list(range(23, 30))  # keep_end: the end of the prompt, BOS kept
    assert (c, r) == (chosen, rejected)  # 8 + 11 <= 25
    p, c, r, _ = truncate_pair(prompt, chosen, rejected, max_length=12, max_prompt_length=8, bos_id=1, eos_id=2)
    assert len(p) == 8 and c == [40, 41, 42, 2] and r == [60, 61, 2]  # completion cut, EOS kept
    p, *_ = truncate_pair(prompt, chosen, rejected, max_length=12, max_prompt_length=8, bos_id=1, eos_id=2,
                          mode="keep_start")
    assert p == prompt[:8]


def _pair_rows():
    return [
        {"prompt": "What is 1 + 2?", "chosen": "3", "rejected": "4"},
        {"prompt": "Name a colour.", "chosen": "Blue, the colour of the sky.", "rejected": "Cat"},
        {"prompt": "Same?", "chosen": "x", "rejected": "x"},  # identical: dropped
    ]


def test_prepare_plain_layout_and_collate(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", _pair_rows())
    r = prepare_preference([src], tmp_path / "preference", "byte", test_fraction=0.0)
    m = r.manifest
    assert m["kind"] == "preference" and m["splits"]["train"]["pairs"] == 2 and m["dropped_identical"] == 1
    pairs = load_pairs(tmp_path, "train")  # parent folder with preference/
    assert pairs[0].prompt_ids.tolist() == encode_chat(TOK, [{"role": "user", "content": "What is 1 + 2?"}])
    assert pairs[0].chosen_ids.tolist() == b("3") + [2] and pairs[0].rejected_ids.tolist() == b("4") + [2]
    assert load_pairs(tmp_path, "test") == []

    batch = collate_pairs(pairs, pad_id=259)
    ids, labels = batch["input_ids"], batch["labels"]
    P0, P1 = len(pairs[0].prompt_ids), len(pairs[1].prompt_ids)
    C1 = len(pairs[1].chosen_ids)
    assert ids.shape == labels.shape == (4, P1 + C1 - 1) and str(ids.dtype) == "torch.int64"
    # row 0: chosen of pair 0 = prompt + "3" EOS; the input drops the final EOS
    seq0 = pairs[0].prompt_ids.tolist() + b("3") + [2]
    assert ids[0, : len(seq0) - 1].tolist() == seq0[:-1]
    assert ids[0, len(seq0) - 1 :].eq(259).all()
    expected = [-100] * (P0 - 1) + b("3") + [2]
    expected += [-100] * (ids.shape[1] - len(expected))
    assert labels[0].tolist() == expected
    # row 2: rejected of pair 0 shares the prompt; row 1/3 are pair 1's chosen/rejected
    assert labels[2].tolist()[P0 - 1 : P0 + 1] == b("4") + [2]
    assert ids[1, :P1].tolist() == pairs[1].prompt_ids.tolist() == ids[3, :P1].tolist()
    assert labels[1, P1 - 1 :].tolist() == pairs[1].chosen_ids.tolist()
    assert (labels[3] != -100).sum() == len(pairs[1].rejected_ids)
    # every scored label is the next input token (except the final EOS, which is not an input)
    mask = (labels[:, :-1] != -100) & (ids[:, 1:] != 259)
    assert (labels[:, :-1][mask] == ids[:, 1:][mask]).all()

    sft = collate_sft(pairs, pad_id=259)
    assert sft["input_ids"].shape[0] == 2
    assert sft["labels"][0].tolist() == labels[0].tolist()[: sft["labels"].shape[1]]


def test_ultrafeedback_layout_and_split_field(tmp_path):
    conv = [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hello"}]
    rows = [
        {"prompt": "Hello", "chosen": conv + [{"role": "assistant", "content": "Hi there!"}],
         "rejected": conv + [{"role": "assistant", "content": "Go away."}], "split": "test_prefs"},
        {"prompt": "Q", "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}],
         "split": "train_prefs"},
    ]
    src = write_jsonl(tmp_path / "uf.jsonl", rows)
    prepare_preference([src], tmp_path / "d", "byte")
    (test,) = load_pairs(tmp_path / "d", "test")
    assert test.prompt_ids.tolist() == encode_chat(TOK, conv)  # all but the last assistant message
    assert test.chosen_ids.tolist() == b("Hi there!") + [2] and test.rejected_ids.tolist() == b("Go away.") + [2]
    (train,) = load_pairs(tmp_path / "d", "train")
    assert train.prompt_ids.tolist() == [1] + b("<|user|>\nQ") + [2] + b("\n<|assistant|>\n")


def test_parquet_input_and_hash_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(200)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    m = prepare_preference([tmp_path / "p.parquet"], tmp_path / "d", "byte", test_fraction=0.2).manifest
    n_test = m["splits"]["test"]["pairs"]
    assert 15 < n_test < 70 and n_test + m["splits"]["train"]["pairs"] == 200
    again = prepare_preference([tmp_path / "p.parquet"], tmp_path / "d2", "byte", test_fraction=0.2).manifest
    assert [f["sha256"] for f in again["files"]] == [f["sha256"] for f in m["files"]]


def test_recipe_lengths_and_truncation_counted(tmp_path):
    rows = [{"prompt": "p" * 200, "chosen": "c" * 200, "rejected": "r"}]
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    m = prepare_preference([src], tmp_path / "d", "byte", recipe="tiny", test_fraction=0).manifest
    assert m["options"]["max_length"] == 128 and m["options"]["max_prompt_length"] == 64 and m["truncated"] == 1
    (pair,) = load_pairs(tmp_path / "d")
    assert len(pair.prompt_ids) == 64 and pair.prompt_ids[0] == 1
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 128 and pair.chosen_ids[-1] == 2


def test_sft_kind(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"prompt": "2+2?", "completion": "4"}]
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    m = prepare_preference([src], tmp_path / "d", "byte", kind="sft", test_fraction=0).manifest
    assert m["kind"] == "sft"
    pairs = load_pairs(tmp_path / "d")
    assert pairs[1].chosen_ids.tolist() == b("4") + [2] and len(pairs[1].rejected_ids) == 0
    assert collate_sft(pairs, 259)["labels"].shape[0] == 2
    with pytest.raises(UsageError, match="no rejected"):
        collate_pairs(pairs, 259)


def test_bad_records_name_file_and_line(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(_pair_rows()[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    code = main(["data", "prepare", "--kind", "preference", str(src), "-t", "byte", "--out", str(tmp_path / "o")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "bad.jsonl:2" in err and "rejected" in err
    assert not (tmp_path / "o" / "manifest.json").exists() and not list((tmp_path / "o").glob("*.bin"))
    src.write_text('{"prompt": "x", \n')
    assert main(["data", "prepare", "--kind", "preference", str(src), "-t", "byte", "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1" in " ".join(capsys.readouterr().err.split())


def test_rerun_up_to_date(tmp_path, capsys):
    src = write_jsonl(tmp_path / "p.jsonl", _pair_rows())
    args = ["data", "prepare", "--kind", "preference", str(src), "-t", "byte", "--out", str(tmp_path / "o"),
            "--format", "json"]
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["status"] == "built"
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["status"] == "up_to_date"
    assert main(args + ["--max-length", "600"]) == 0 and json.loads(capsys.readouterr().out)["status"] == "built"
    assert np.load(tmp_path / "o" / "train-index.npy").shape == (2, 4)
