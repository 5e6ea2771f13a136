"""The fused DPO loss op (`dpo_kernels._C`): `spec` validates hyper-parameters and tensors (importable without
the extension, so `dpo_kernels.reference` works unbuilt), `op` calls the C++/CUDA kernels.

Nothing is imported here: importing `op` loads the compiled extension.
"""
