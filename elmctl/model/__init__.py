"""The OpenELM model: PyTorch decoder, KV-cache generation, Apple's HF checkpoint format."""

from __future__ import annotations

from elmctl.model.generate import generate
from elmctl.model.hf import load_pretrained, save_pretrained
from elmctl.model.openelm import KVCache, OpenELM, build_model

__all__ = ["OpenELM", "KVCache", "build_model", "generate", "save_pretrained", "load_pretrained"]
