"""The thin DPO trainer behind `dpo-kernels train`: any HuggingFace causal LM, a preference dataset, the fused
kernels.

    from dpo_kernels.trainer import TrainConfig, train
    result = train(TrainConfig(model="path/or/id", data="pairs.jsonl", output_dir="out", max_steps=100))

Modules, one job each: `config` (TrainConfig: every setting with its help, choices and check), `loop` (set-up and
the step loop), `data` (rows -> batches), `backends` (the loss backends' names), `forward` (the loss backends),
`ref_logps` (reference log-probs: a frozen model or a disk cache), `checkpoint` (atomic checkpoints), `distributed`
(DDP/FSDP2), `metrics_log` (metrics.jsonl, the console line, curves.png).
"""
from dpo_kernels.trainer.config import TrainConfig
from dpo_kernels.trainer.loop import Interrupted, NonFiniteLossError, TrainResult, train

__all__ = ["Interrupted", "NonFiniteLossError", "TrainConfig", "TrainResult", "train"]
