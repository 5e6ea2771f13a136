"""The loss backends' names: the choices of `TrainConfig.loss_backend`, which `trainer.forward` implements.

    fused-linear  backbone hidden states + lm_head weight -> dpo_kernels.FusedLinearDPOLoss (no [2B, T, V] logits)
    logits        model(...).logits -> dpo_kernels.DPOLoss (Triton log-probs on CUDA, then the fused loss op)
    reference     model(...).logits -> dpo_kernels.reference (plain PyTorch, for checking)

The names live apart from the backends so that the declarative config does not import the code it configures.
"""
BACKENDS = ("fused-linear", "logits", "reference")
