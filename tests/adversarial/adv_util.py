"""Helpers for the adversarial tests: a tiny random OpenELM as an HF folder, small tokenizers, demo data."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 17 + 25? 42.",
    "OpenELM uses layer-wise scaling of attention heads.",
] * 40


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models decode 10x faster with one thread than with threads contending on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_hf(folder: Path, tokenizer: Path | None = None, seed: int = 0) -> Path:
    """A randomly initialised tiny-recipe OpenELM saved as an Apple-format HF folder (vocabulary 259).

    With ``tokenizer`` (a tokenizer.model or tokenizer.json) the file is copied in next to the
    weights, so `elmctl generate FOLDER` uses it; without, the folder uses the byte tokenizer.
    """
    import torch

    from elmctl.config import load_recipe
    from elmctl.model import OpenELM
    from elmctl.model.hf import save_pretrained

    torch.manual_seed(seed)
    save_pretrained(OpenELM(load_recipe("tiny").model), folder)
    if tokenizer is not None:
        shutil.copy(tokenizer, folder / tokenizer.name)
    return folder


def small_sentencepiece(folder: Path, vocab_size: int = 80) -> Path:
    """A SentencePiece BPE model with far fewer pieces than the tiny recipe's 259 (unk 0, bos 1, eos 2)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(TEXT))
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=False,
    )
    return folder / "tokenizer.model"


def small_hf_tokenizer(path: Path, vocab_size: int = 120) -> Path:
    """A character-level HF BPE tokenizer.json with <unk>, <s>, </s> (ids 0, 1, 2) and few merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    tok.save(str(path))
    return path


def demo_data(folder: Path) -> Path:
    """`elmctl data demo` output (pretrain shards + preference pairs), small."""
    from elmctl.data.demo import make_demo

    make_demo(folder, seed=0, num_docs=300, num_pairs=16, num_test_pairs=8)
    return folder
