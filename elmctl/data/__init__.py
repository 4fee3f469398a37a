"""Data: tokenizers, pre-training token shards, preference/SFT pairs with the chat template, demo data.

Light at import (numpy only); torch is imported inside the collate functions.

- :func:`elmctl.data.tokenizers.load_tokenizer` - ``byte``, SentencePiece ``tokenizer.model``, HF ``tokenizer.json``
- :func:`elmctl.data.prepare.prepare_pretrain`, :class:`elmctl.data.shards.TokenDataset`
- :func:`elmctl.data.preference.prepare_preference`, ``load_pairs``, ``collate_pairs``, ``collate_sft``
- :mod:`elmctl.data.chat` - OpenELM-Instruct chat template (``format_prompt``, ``encode_chat``)
- :func:`elmctl.data.demo.make_demo` - synthetic corpus + number-comparison preference pairs
"""

from __future__ import annotations

from elmctl.data._manifest import resolve_data_dir

__all__ = ["resolve_data_dir", "IGNORE_INDEX"]

#: the label of a position no loss counts (prompt, padding, past the end): the collators write it, the
#: objectives (``train.objectives``, ``train.dpo``) skip it; the value transformers uses
IGNORE_INDEX = -100
