"""Recipe schema: OpenELM architecture, Table 9 (pre-training), Table 10 (instruction tuning).

Every model is frozen and rejects unknown keys. Inputs are never overwritten by derived values:
per-layer shapes, parameter counts and the like live in :mod:`elmctl.config.derived`.
Field names follow the paper/CoreNet where one exists; units are in the names.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

__all__ = [
    "FieldProblems",
    "ModelConfig",
    "DataFilters",
    "PretrainConfig",
    "InstructConfig",
    "Provenance",
    "Recipe",
    "PreferenceLoss",
    "PREFERENCE_LOSSES",
    "TUNE_LOSSES",
]

#: the preference losses of DPO tuning (``instruct.loss``, ``elmctl tune --loss``): sigmoid = DPO,
#: hinge = RSO/SLiC-style; ``elmctl tune --loss`` also takes sft (supervised fine-tuning on the chosen answers)
PreferenceLoss = Literal["sigmoid", "hinge"]
PREFERENCE_LOSSES: tuple[str, ...] = get_args(PreferenceLoss)
TUNE_LOSSES: tuple[str, ...] = (*PREFERENCE_LOSSES, "sft")

# Strict scalars: a YAML `true` is not the number 1, "16" is not an int and 4.0 is not a layer
# count. Floats still accept ints (`rope_freq_constant: 10000`). The loader's YAML reader parses
# `1e-3` as a float (PyYAML alone would read it as a string).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]

# Upper bounds keep every derived number a finite float (no OverflowError in `recipe show`).
_BIG = 1 << 40
# Positions: the RoPE tables (2 x positions x head_dim fp32) are built when a model is, from the
# recipe or an HF config.json; 1M positions (256x OpenELM's 4096) keeps them under 1 GiB at d_h 128.
_MAX_POSITIONS = 1 << 20


class FieldProblems(ValueError):
    """Cross-field problems of one section, each tied to the field a user should edit.

    ``items`` holds (field path relative to the section, message). The loader turns each into its
    own problem with the full dotted path and the YAML line of that field.
    """

    def __init__(self, items: list[tuple[str, str]]):
        self.items = items
        super().__init__("; ".join(msg for _, msg in items))


def _raise(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise FieldProblems(problems)


class _Frozen(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False
    )


class ModelConfig(_Frozen):
    """The OpenELM decoder (CoreNet ``general_gpt.py``; HF ``configuration_openelm.py``)."""

    num_layers: Int = Field(ge=1, le=256, description="Number of transformer layers N.")
    model_dim: Int = Field(ge=8, le=1 << 20, description="Model (embedding) width d_model.")
    head_dim: Int = Field(ge=2, le=1 << 16, description="Width of one attention head d_h (3B: 128).")
    num_gqa_groups: Int = Field(
        ge=1, le=1 << 10, description="Query heads that share one key/value head (4 for every OpenELM)."
    )
    qkv_multipliers: tuple[Float, Float] = Field(
        description="alpha (min, max): layer-wise scaling of attention width, interpolated over depth."
    )
    ffn_multipliers: tuple[Float, Float] = Field(
        description="beta (min, max): layer-wise scaling of FFN width, interpolated over depth."
    )
    ffn_dim_divisor: Int = Field(ge=1, le=1 << 16, description="FFN widths are rounded to multiples of this.")
    normalization: Literal["rms_norm"] = "rms_norm"
    norm_eps: Float = Field(default=1e-6, gt=0, lt=1e-2)
    normalize_qk_projections: Bool = Field(
        default=True, description="Per-head RMSNorm on queries and keys before RoPE."
    )
    positional_embedding: Literal["rope"] = "rope"
    rope_freq_constant: Float = Field(default=10000.0, gt=1)
    rope_max_length: Int = Field(default=4096, ge=1, le=_MAX_POSITIONS, description="Positions in the RoPE cache.")
    activation: Literal["swiglu"] = "swiglu"
    context_length: Int = Field(ge=1, le=_MAX_POSITIONS, description="Training sequence length.")
    vocab_size: Int = Field(ge=2, le=1 << 24, description="Vocabulary of the released (HF) checkpoints.")
    padded_vocab_size: Int = Field(
        ge=2, le=1 << 24, description="Embedding rows used in training (pad + padding)."
    )
    pad_token_id: Int = Field(ge=0)
    bos_token_id: Int = Field(default=1, ge=0)
    eos_token_id: Int = Field(default=2, ge=0)
    share_input_output_layers: Bool = Field(default=True, description="Tie the output head to the embedding.")

    @field_validator("qkv_multipliers", "ffn_multipliers")
    @classmethod
    def _ordered_positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1] <= 64):
            raise ValueError(f"must be (min, max) with 0 < min <= max <= 64, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        problems: list[tuple[str, str]] = []
        if self.model_dim % self.head_dim:
            problems.append(
                ("model_dim", f"model_dim {self.model_dim} is not divisible by head_dim {self.head_dim}")
            )
        if self.head_dim % 2:
            problems.append(("head_dim", f"head_dim {self.head_dim} must be even (RoPE rotates pairs of dims)"))
        if self.padded_vocab_size < self.vocab_size:
            problems.append(
                (
                    "padded_vocab_size",
                    f"padded_vocab_size {self.padded_vocab_size} is smaller than vocab_size {self.vocab_size}",
                )
            )
        if self.pad_token_id >= self.padded_vocab_size:
            problems.append(
                (
                    "pad_token_id",
                    f"pad_token_id {self.pad_token_id} is outside padded_vocab_size {self.padded_vocab_size}",
                )
            )
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                problems.append((name, f"{name} {getattr(self, name)} is outside vocab_size {self.vocab_size}"))
        ids = {"pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}
        names = list(ids)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if ids[a] == ids[b]:
                    problems.append((b, f"{b} {ids[b]} equals {a}; pad, bos and eos need distinct ids"))
        if self.rope_max_length < self.context_length:
            problems.append(
                (
                    "rope_max_length",
                    f"rope_max_length {self.rope_max_length} is shorter than context_length {self.context_length}",
                )
            )
        # Every layer's query heads form whole groups of num_gqa_groups by construction
        # (make_divisible(d * alpha, d_h * num_gqa_groups)): test_every_layer_has_whole_kv_groups_by_construction.
        _raise(problems)
        return self


class DataFilters(_Frozen):
    """Documents dropped before pre-training (CoreNet pretraining configs)."""

    min_chars: Int = Field(default=200, ge=0, le=_BIG, description="Drop texts shorter than this many characters.")
    min_tokens: Int = Field(default=256, ge=0, le=_BIG, description="Drop texts shorter than this many tokens.")


class PretrainConfig(_Frozen):
    """Paper Table 9 (CoreNet ``pretraining_configs/openelm_*.yaml``)."""

    sequences_per_gpu: Int = Field(ge=1, le=1 << 20, description="Micro-batch of the paper's run, sequences per GPU.")
    num_gpus: Int = Field(ge=1, le=1 << 20, description="GPUs of the paper's run (8 per node x 16 nodes).")
    warmup_iterations: Int = Field(ge=0, le=_BIG)
    max_iterations: Int = Field(ge=1, le=_BIG)
    warmup_init_lr: Float = Field(ge=0, description="LR at iteration 0 of the linear warm-up.")
    max_lr: Float = Field(gt=0, le=1.0)
    min_lr: Float = Field(ge=0, description="End of the cosine decay (0.1 x max_lr in the paper).")
    adam_betas: tuple[Float, Float] = (0.9, 0.95)
    adam_eps: Float = Field(default=1e-8, gt=0, lt=1e-2)
    weight_decay: Float = Field(default=0.1, ge=0, lt=1.0)
    grad_clip: Float = Field(default=1.0, gt=0, le=1e6)
    z_loss: Bool = True
    z_loss_coef: Float = Field(default=1e-4, ge=0, le=1.0)
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: Bool = False
    fsdp: Bool = False
    attention_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = Field(
        default="auto",
        description="SDPA kernel tried first (the others follow as fallbacks); auto: PyTorch's own order. "
        "Not in the paper: a speed setting, same math.",
    )
    data_filters: DataFilters = DataFilters()
    eval_every: Int = Field(default=5000, ge=1, le=_BIG, description="Iterations between validation passes.")
    checkpoint_every: Int = Field(default=5000, ge=1, le=_BIG, description="Iterations between checkpoints.")
    keep_checkpoints: Int = Field(default=5, ge=1, le=1 << 20, description="How many recent checkpoints to keep.")
    seed: Int = Field(default=0, ge=0, le=2**32 - 1, description="RNG seed (numpy needs < 2**32).")

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 < b < 1 for b in v):
            raise ValueError(f"each beta must lie in (0, 1), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        problems: list[tuple[str, str]] = []
        if self.warmup_iterations >= self.max_iterations:
            problems.append(
                (
                    "warmup_iterations",
                    f"warmup_iterations {self.warmup_iterations} must be below max_iterations {self.max_iterations}",
                )
            )
        if self.warmup_init_lr > self.min_lr:
            problems.append(
                (
                    "warmup_init_lr",
                    f"need warmup_init_lr <= min_lr <= max_lr, got warmup_init_lr {self.warmup_init_lr:g} > "
                    f"min_lr {self.min_lr:g}",
                )
            )
        if self.min_lr > self.max_lr:
            problems.append(
                ("min_lr", f"need warmup_init_lr <= min_lr <= max_lr, got min_lr {self.min_lr:g} > max_lr {self.max_lr:g}")
            )
        _raise(problems)
        return self


class InstructConfig(_Frozen):
    """Paper Table 10: DPO via alignment-handbook/TRL (CoreNet ``README-instruct.md``)."""

    method: Literal["dpo"] = "dpo"
    loss: PreferenceLoss = Field(description="sigmoid = DPO; hinge = RSO/SLiC-style.")
    beta: Float = Field(default=0.01, gt=0, le=10, description="DPO temperature.")
    lr: Float = Field(gt=0, lt=1, description="The paper's chosen learning rate for this size.")
    epochs: Int = Field(ge=1, le=1000, description="The paper's chosen number of epochs for this size.")
    lr_grid: tuple[Float, ...] = Field(min_length=1, max_length=1000, description="Learning rates searched by tune-sweep.")
    epoch_grid: tuple[Int, ...] = Field(min_length=1, max_length=1000, description="Epoch counts searched by tune-sweep.")
    per_device_batch: Int = Field(default=8, ge=1, le=1 << 20)
    grad_accumulation: Int = Field(default=2, ge=1, le=1 << 20)
    num_gpus: Int = Field(default=8, ge=1, le=1 << 20, description="GPUs of the paper's run.")
    max_length: Int = Field(default=1024, ge=2, le=1 << 24)
    max_prompt_length: Int = Field(default=512, ge=1, le=1 << 24)
    warmup_ratio: Float = Field(default=0.1, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: Float = Field(default=0.0, ge=0, lt=1)
    sharding: Literal["none", "zero3", "fsdp"] = "zero3"
    gradient_checkpointing: Bool = True
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: Int = Field(default=42, ge=0, le=2**32 - 1)

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
        problems: list[tuple[str, str]] = []
        if any(x >= 1 for x in self.lr_grid):
            problems.append(("lr_grid", f"learning rates must be below 1, got {[float(x) for x in self.lr_grid]}"))
        if any(x > 1000 for x in self.epoch_grid):
            problems.append(("epoch_grid", f"epochs must be at most 1000, got {list(self.epoch_grid)}"))
        if self.lr not in self.lr_grid:
            problems.append(("lr", f"lr {self.lr:g} is not in lr_grid {[float(x) for x in self.lr_grid]}"))
        if self.epochs not in self.epoch_grid:
            problems.append(("epochs", f"epochs {self.epochs} is not in epoch_grid {list(self.epoch_grid)}"))
        if self.max_prompt_length >= self.max_length:
            problems.append(
                (
                    "max_prompt_length",
                    f"max_prompt_length {self.max_prompt_length} must be below max_length {self.max_length}",
                )
            )
        _raise(problems)
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
    pretrain_gpu_memory_gb: Int = Field(ge=1, le=1 << 20)
    pretrain_nodes: Int = Field(ge=1, le=1 << 20)
    pretrain_days: Float | None = Field(default=None, gt=0, description="Reported training time (None: not stated).")
    instruct_gpu: str = Field(description="GPU type of the paper's instruction-tuning run.")
    instruct_gpu_memory_gb: Int = Field(ge=1, le=1 << 20)
    instruct_hours: Float | None = Field(default=None, gt=0)
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
        problems: list[tuple[str, str]] = []
        if self.instruct.max_length > self.model.rope_max_length:
            problems.append(
                (
                    "instruct.max_length",
                    f"instruct.max_length {self.instruct.max_length} exceeds model.rope_max_length "
                    f"{self.model.rope_max_length}",
                )
            )
        if self.pretrain.num_gpus % self.provenance.pretrain_nodes:
            problems.append(
                (
                    "pretrain.num_gpus",
                    f"pretrain.num_gpus {self.pretrain.num_gpus} is not a multiple of provenance.pretrain_nodes "
                    f"{self.provenance.pretrain_nodes}",
                )
            )
        _raise(problems)
        return self

