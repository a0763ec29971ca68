"""The options every training command shares (DESIGN.md §4), validated where they are parsed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from posttrain.config.checks import Needs
from posttrain.errors import ConfigError
from posttrain.models.lora import LoraConfig

REPORTERS = ("jsonl", "tensorboard", "wandb")


@dataclass
class TrainConfig:
    """Options shared by every training command."""

    # Checked where the config is parsed (config/checks.py); cross-field rules: validate().
    RANGES: ClassVar[dict[str, str]] = {
        "epochs": "> 0", "batch_size": ">= 1", "grad_accum": ">= 1", "lr": "> 0",
        "warmup_steps": ">= 0", "weight_decay": ">= 0", "adam_beta1": "[0, 1)",
        "adam_beta2": "[0, 1)", "max_grad_norm": ">= 0", "max_length": ">= 2",
        "save_steps": ">= 0", "save_total_limit": ">= 0", "eval_steps": ">= 0",
        "logging_steps": ">= 1", "max_bad_steps": ">= 1", "dist_timeout": "> 0",
    }
    ONLY_WITH: ClassVar[dict[str, Needs]] = {
        "epochs": Needs("max_steps", (-1,), "max_steps > 0 sets the run's length"),
        "eval_steps": Needs("eval_data", None, "evaluation runs on eval_data"),
        "cpu_offload": Needs("strategy", ("fsdp2",), "only FSDP2 offloads its shards"),
        "hf_checkpoints": Needs("strategy", ("fsdp2",), "ddp checkpoints are HF directories"),
    }

    model: str = field(
        default="tiny",
        metadata={"help": "HF dir, hub id, .gguf file, or 'tiny' for the built-in tiny model"},
    )
    data: str | list | None = field(default=None, metadata={"help": "file, dir, hub id, or a list"})
    eval_data: str | list | None = field(default=None, metadata={"help": "held-out data or a list"})
    output_dir: str = field(
        default="runs/run", metadata={"help": "run dir: config.yaml, metrics, checkpoints, final/"}
    )
    max_steps: int = field(
        default=-1, metadata={"help": "optimizer steps; -1 = derive from epochs"}
    )
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (fractions ok)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(
        default="cosine", metadata={"help": "learning-rate decay after warmup"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear LR warmup from 0"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "clip the global grad norm to this; 0 = no clipping"}
    )
    max_length: int = field(default=1024, metadata={"help": "max tokens per sequence"})
    save_steps: int = field(
        default=0, metadata={"help": "checkpoint every N steps; 0 = only at the end"}
    )
    save_total_limit: int = field(
        default=2, metadata={"help": "checkpoints to keep, oldest pruned first; 0 = keep all"}
    )
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps; 0 = at the end"})
    logging_steps: int = field(default=1, metadata={"help": "log metrics every N steps"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order and sampling"})
    precision: Literal["bf16", "fp32"] = field(
        default="bf16", metadata={"help": "bf16 autocast (fp32 master weights) or pure fp32"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations to save memory"}
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the decoder layers' training forward (fuses "
                          "elementwise ops; the first step compiles)"},
    )
    strategy: Literal["ddp", "fsdp2"] = field(
        default="ddp",
        metadata={"help": "data parallelism under torchrun: ddp (a full replica per rank) or "
                          "fsdp2 (weights, gradients and optimizer states sharded; sharded "
                          "checkpoints); see docs/distributed.md"},
    )
    cpu_offload: bool = field(
        default=False,
        metadata={"help": "fsdp2: keep the shards and the optimizer step on the CPU (saves "
                          "accelerator memory, costs transfers)"},
    )
    hf_checkpoints: bool = field(
        default=False,
        metadata={"help": "fsdp2: each checkpoint also holds the full model as an HF directory "
                          "(model/, gathered to rank 0), for evaluating it while training runs"},
    )
    dist_timeout: float = field(
        default=1800.0,
        metadata={"help": "seconds a rank waits for the others in a collective before the run "
                          "fails, naming the rank that died or stalled"},
    )
    resume: bool = field(
        default=False, metadata={"help": "continue from the last checkpoint in output_dir"}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace the run already in output_dir (its final/, checkpoints, "
                          "metrics); without it such a run is refused"},
    )
    report_to: list[str] = field(
        default_factory=lambda: ["jsonl"],
        metadata={"help": "metric sinks: any of jsonl, tensorboard, wandb"},
    )
    on_bad_row: Literal["error", "skip"] = field(
        default="error", metadata={"help": "a malformed data row stops the run, or is skipped"}
    )
    max_bad_steps: int = field(
        default=5, metadata={"help": "consecutive non-finite steps before the run aborts"}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow model code from the hub (runs that code!)"}
    )
    lora: LoraConfig = field(
        default_factory=LoraConfig, metadata={"help": "LoRA adapters (lora.r > 0 turns them on)"}
    )

    def validate(self) -> None:
        self._validate_steps()
        self._validate_report_to()

    def _validate_steps(self) -> None:
        if self.max_steps != -1 and self.max_steps < 1:
            raise ConfigError(
                f"max_steps must be -1 (derive from epochs) or >= 1, got {self.max_steps}"
            )
        # A warmup longer than the run never reaches the peak LR: almost surely a typo.
        if self.max_steps > 0 and self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})"
            )

    def _validate_report_to(self) -> None:
        for name in self.report_to:
            if name not in REPORTERS:
                raise ConfigError(
                    f"report_to: unknown sink {name!r}; choose from {', '.join(REPORTERS)}"
                )

