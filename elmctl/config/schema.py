"""Recipe schema: OpenELM architecture, Table 9 (pre-training), Table 10 (instruction tuning).

Every model is frozen and rejects unknown keys. Inputs are never overwritten by derived values:
per-layer shapes, parameter counts and the like live in :mod:`elmctl.config.derived`.
Field names follow the paper/CoreNet where one exists; units are in the names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from elmctl.config.derived import layer_shapes

__all__ = ["ModelConfig", "DataFilters", "PretrainConfig", "InstructConfig", "Provenance", "Recipe"]

class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class ModelConfig(_Frozen):
    """The OpenELM decoder (CoreNet ``general_gpt.py``; HF ``configuration_openelm.py``)."""

    num_layers: int = Field(ge=1, le=256, description="Number of transformer layers N.")
    model_dim: int = Field(ge=8, description="Model (embedding) width d_model.")
    head_dim: int = Field(ge=2, description="Width of one attention head d_h (3B: 128).")
    num_gqa_groups: int = Field(
        ge=1, description="Query heads that share one key/value head (4 for every OpenELM)."
    )
    qkv_multipliers: tuple[float, float] = Field(
        description="alpha (min, max): layer-wise scaling of attention width, interpolated over depth."
    )
    ffn_multipliers: tuple[float, float] = Field(
        description="beta (min, max): layer-wise scaling of FFN width, interpolated over depth."
    )
    ffn_dim_divisor: int = Field(ge=1, description="FFN widths are rounded to multiples of this.")
    normalization: Literal["rms_norm"] = "rms_norm"
    norm_eps: float = Field(default=1e-6, gt=0, lt=1e-2)
    normalize_qk_projections: bool = Field(
        default=True, description="Per-head RMSNorm on queries and keys before RoPE."
    )
    positional_embedding: Literal["rope"] = "rope"
    rope_freq_constant: float = Field(default=10000.0, gt=1)
    rope_max_length: int = Field(default=4096, ge=1, description="Positions in the RoPE cache.")
    activation: Literal["swiglu"] = "swiglu"
    context_length: int = Field(ge=1, description="Training sequence length.")
    vocab_size: int = Field(ge=2, description="Vocabulary of the released (HF) checkpoints.")
    padded_vocab_size: int = Field(ge=2, description="Embedding rows used in training (pad + padding).")
    pad_token_id: int = Field(ge=0)
    bos_token_id: int = Field(default=1, ge=0)
    eos_token_id: int = Field(default=2, ge=0)
    share_input_output_layers: bool = Field(default=True, description="Tie the output head to the embedding.")

    @field_validator("qkv_multipliers", "ffn_multipliers")
    @classmethod
    def _ordered_positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError(f"must be (min, max) with 0 < min <= max, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        problems = []
        if self.model_dim % self.head_dim:
            problems.append(f"model_dim {self.model_dim} is not divisible by head_dim {self.head_dim}")
        if self.padded_vocab_size < self.vocab_size:
            problems.append(
                f"padded_vocab_size {self.padded_vocab_size} is smaller than vocab_size {self.vocab_size}"
            )
        if self.pad_token_id >= self.padded_vocab_size:
            problems.append(f"pad_token_id {self.pad_token_id} is outside padded_vocab_size {self.padded_vocab_size}")
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                problems.append(f"{name} {getattr(self, name)} is outside vocab_size {self.vocab_size}")
        if self.rope_max_length < self.context_length:
            problems.append(
                f"rope_max_length {self.rope_max_length} is shorter than context_length {self.context_length}"
            )
        if not problems:
            for i, layer in enumerate(layer_shapes(self)):
                if layer.query_heads % self.num_gqa_groups:
                    problems.append(
                        f"layer {i}: {layer.query_heads} query heads are not divisible by "
                        f"num_gqa_groups {self.num_gqa_groups}"
                    )
                    break
        if problems:
            raise ValueError("; ".join(problems))
        return self


class DataFilters(_Frozen):
    """Documents dropped before pre-training (CoreNet pretraining configs)."""

    min_chars: int = Field(default=200, ge=0, description="Drop texts shorter than this many characters.")
    min_tokens: int = Field(default=256, ge=0, description="Drop texts shorter than this many tokens.")


class PretrainConfig(_Frozen):
    """Paper Table 9 (CoreNet ``pretraining_configs/openelm_*.yaml``)."""

    sequences_per_gpu: int = Field(ge=1, description="Micro-batch of the paper's run, sequences per GPU.")
    num_gpus: int = Field(ge=1, description="GPUs of the paper's run (8 per node x 16 nodes).")
    warmup_iterations: int = Field(ge=0)
    max_iterations: int = Field(ge=1)
    warmup_init_lr: float = Field(ge=0, description="LR at iteration 0 of the linear warm-up.")
    max_lr: float = Field(gt=0, le=1.0)
    min_lr: float = Field(ge=0, description="End of the cosine decay (0.1 x max_lr in the paper).")
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = Field(default=1e-8, gt=0, lt=1e-2)
    weight_decay: float = Field(default=0.1, ge=0, lt=1.0)
    grad_clip: float = Field(default=1.0, gt=0)
    z_loss: bool = True
    z_loss_coef: float = Field(default=1e-4, ge=0)
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    fsdp: bool = False
    data_filters: DataFilters = DataFilters()
    eval_every: int = Field(default=5000, ge=1, description="Iterations between validation passes.")
    checkpoint_every: int = Field(default=5000, ge=1, description="Iterations between checkpoints.")
    keep_checkpoints: int = Field(default=5, ge=1, description="How many recent checkpoints to keep.")
    seed: int = 0

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 < b < 1 for b in v):
            raise ValueError(f"each beta must lie in (0, 1), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        problems = []
        if self.warmup_iterations >= self.max_iterations:
            problems.append(
                f"warmup_iterations {self.warmup_iterations} must be below max_iterations {self.max_iterations}"
            )
        if not (self.warmup_init_lr <= self.min_lr <= self.max_lr):
            problems.append(
                f"need warmup_init_lr <= min_lr <= max_lr, got {self.warmup_init_lr:g}, "
                f"{self.min_lr:g}, {self.max_lr:g}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class InstructConfig(_Frozen):
    """Paper Table 10: DPO via alignment-handbook/TRL (CoreNet ``README-instruct.md``)."""

    method: Literal["dpo"] = "dpo"
    loss: Literal["sigmoid", "hinge"] = Field(description="sigmoid = DPO; hinge = RSO/SLiC-style.")
    beta: float = Field(default=0.01, gt=0, le=10, description="DPO temperature.")
    lr: float = Field(gt=0, lt=1, description="The paper's chosen learning rate for this size.")
    epochs: int = Field(ge=1, le=1000, description="The paper's chosen number of epochs for this size.")
    lr_grid: tuple[float, ...] = Field(min_length=1, description="Learning rates searched by tune-sweep.")
    epoch_grid: tuple[int, ...] = Field(min_length=1, description="Epoch counts searched by tune-sweep.")
    per_device_batch: int = Field(default=8, ge=1)
    grad_accumulation: int = Field(default=2, ge=1)
    num_gpus: int = Field(default=8, ge=1, description="GPUs of the paper's run.")
    max_length: int = Field(default=1024, ge=2)
    max_prompt_length: int = Field(default=512, ge=1)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0, lt=1)
    sharding: Literal["none", "zero3", "fsdp"] = "zero3"
    gradient_checkpointing: bool = True
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 42

    @field_validator("lr_grid", "epoch_grid")
    @classmethod
    def _grid(cls, v: tuple) -> tuple:
        if any(x <= 0 for x in v):
            raise ValueError(f"grid values must be positive, got {list(v)}")
        if len(set(v)) != len(v):
            dups = sorted({x for x in v if v.count(x) > 1})
            raise ValueError(f"grid values must be unique, repeated: {dups}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "InstructConfig":
        problems = []
        if self.lr not in self.lr_grid:
            problems.append(f"lr {self.lr:g} is not in lr_grid {[float(x) for x in self.lr_grid]}")
        if self.epochs not in self.epoch_grid:
            problems.append(f"epochs {self.epochs} is not in epoch_grid {list(self.epoch_grid)}")
        if self.max_prompt_length >= self.max_length:
            problems.append(
                f"max_prompt_length {self.max_prompt_length} must be below max_length {self.max_length}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def effective_batch(self) -> int:
        """Pairs per optimizer step in the paper's run (8 x 2 x 8 = 128)."""
        return self.per_device_batch * self.grad_accumulation * self.num_gpus


class Provenance(_Frozen):
    """Where the values come from and what the paper's hardware was."""

    paper: str = "Mehta et al. 2024, OpenELM (arXiv 2404.14619)"
    pretrain_table: str = Field(description="Paper table for the pre-training values.")
    instruct_table: str = Field(description="Paper table for the instruction-tuning values.")
    corenet_config: str | None = Field(default=None, description="CoreNet config file of the recipe.")
    hf_config: str | None = Field(default=None, description="Released HF checkpoint this recipe matches.")
    pretrain_gpu: str = Field(description="GPU type of the paper's pre-training run.")
    pretrain_gpu_memory_gb: int = Field(ge=1)
    pretrain_nodes: int = Field(ge=1)
    pretrain_days: float | None = Field(default=None, gt=0, description="Reported training time (None: not stated).")
    instruct_gpu: str = Field(description="GPU type of the paper's instruction-tuning run.")
    instruct_gpu_memory_gb: int = Field(ge=1)
    instruct_hours: float | None = Field(default=None, gt=0)
    sources: dict[str, str] = Field(default_factory=dict, description="Field group -> source it was taken from.")
    notes: tuple[str, ...] = ()


class Recipe(_Frozen):
    """One OpenELM size: architecture + Table 9 + Table 10 + provenance."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-.]*$", description="What users type: 270m, 450m, 1_1b, 3b, tiny.")
    description: str = ""
    model: ModelConfig
    pretrain: PretrainConfig
    instruct: InstructConfig
    provenance: Provenance

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        problems = []
        if self.instruct.max_length > self.model.rope_max_length:
            problems.append(
                f"instruct.max_length {self.instruct.max_length} exceeds model.rope_max_length "
                f"{self.model.rope_max_length}"
            )
        if self.pretrain.num_gpus % self.provenance.pretrain_nodes:
            problems.append(
                f"pretrain.num_gpus {self.pretrain.num_gpus} is not a multiple of provenance.pretrain_nodes "
                f"{self.provenance.pretrain_nodes}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self
