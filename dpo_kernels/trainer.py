"""The thin DPO trainer: any HuggingFace causal LM, a preference dataset, the fused kernels.

    from dpo_kernels.trainer import TrainConfig, train
    result = train(TrainConfig(model="path/or/id", data="pairs.jsonl", output_dir="out", max_steps=100))

The loop is meant to be read in one sitting: every knob is a field of `TrainConfig` below, and `train` shows the
step (forward, loss, backward, clip, step, zero_grad) with one log line per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    # --- what to train, on what, where to write ---
    model: str = ""                        # HF model dir or hub id already in the local cache (local_files_only)
    data: str = ""                         # JSON / JSONL / parquet file, or a `datasets.save_to_disk` directory
    output_dir: str = "dpo-output"         # checkpoints, metrics.jsonl, curves.png
    eval_data: str | None = None           # held-out pairs (same formats); None = no evaluation
    tokenizer: str | None = None           # defaults to `model`
    ref_model: str | None = None           # a separate frozen reference; None = frozen copy of the initial policy
    precompute_ref: bool = False           # one no-grad pass of the reference, cached on disk, reused by later runs
    # --- length of the run ---
    max_steps: int = -1                    # optimizer steps; -1 = run `epochs` epochs
    epochs: int = 1
    batch_size: int = 4                    # pairs per micro-batch per process (2*batch_size rows: chosen then rejected)
    grad_accum: int = 1                    # micro-batches per optimizer step
    eval_batch_size: int | None = None     # defaults to batch_size
    # --- optimizer and schedule (AdamW + transformers.get_scheduler) ---
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_scheduler: str = "cosine"           # any transformers.get_scheduler name: cosine, linear, constant, ...
    warmup_steps: int = 0                  # wins over warmup_ratio when > 0
    warmup_ratio: float = 0.1              # fraction of the run spent warming up
    max_grad_norm: float = 1.0             # clip the global gradient norm; <= 0 disables clipping
    # --- the DPO loss (dpo_kernels.dpo_loss) ---
    beta: float = 0.1
    loss_type: str = "sigmoid"             # one name or a comma list, e.g. "sigmoid,sft"
    loss_weights: list[float] | None = None  # one weight per loss type (comma list on the command line)
    label_smoothing: float = 0.0           # conservative DPO / robust eps
    gamma: float | None = None             # SimPO target margin
    tau: float | None = None               # DiscoPOP temperature
    dpop_lambda: float | None = None       # DPO-Positive penalty weight
    loss_params: dict = field(default_factory=dict)  # any other keyword dpo_loss takes
    # --- tokenization ---
    max_length: int = 1024                 # prompt + response tokens per row
    max_prompt_length: int = 512           # prompts keep their last tokens
    skip_bad_rows: bool = False            # drop (and count) malformed rows instead of stopping with an error
    # --- how the step runs ---
    loss_backend: str = "fused-linear"     # fused-linear (hidden states + lm_head) | logits | reference (plain torch)
    precision: str = "auto"                # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    gradient_checkpointing: bool = False
    distributed: str = "none"              # none | ddp | fsdp (launch with torchrun)
    device: str = "auto"                   # auto | cpu | cuda
    seed: int = 42
    # --- logging, evaluation, checkpoints ---
    log_every: int = 1                     # steps between metrics.jsonl lines
    eval_every: int = 0                    # steps between evaluations (0 = only at the end)
    save_every: int = 0                    # steps between checkpoints (0 = only at the end)
    resume: str | None = None              # checkpoint dir, or "latest" for the newest one in output_dir
    max_nonfinite_steps: int = 5           # stop after this many non-finite losses in a row
    progress: bool = True                  # tqdm progress bar
    plot: bool = True                      # curves.png at the end


@dataclass
class TrainResult:
    output_dir: str
    global_step: int                       # optimizer steps taken in total (resumed runs count from the start)
    final_checkpoint: str | None           # OUTPUT_DIR/checkpoint-STEP written at the end
    history: list[dict]                    # every logged metrics.jsonl record of this run
    eval_metrics: dict                     # the last evaluation ({} without eval_data)
    skipped_steps: int = 0                 # steps skipped because the loss was not finite
    dropped_rows: int = 0                  # rows dropped by skip_bad_rows
    plot_path: str | None = None


def train(config: TrainConfig) -> TrainResult:
    """Runs DPO as `config` says and returns what happened; see TrainConfig for every field."""
    raise NotImplementedError("the trainer loop is being written (helper D1)")
