"""TRL, the `datasets` its trainer reads and the package's TRL drop-in, or a skip of the whole importing test module
where the optional `trl` extra is missing:

    from tests.integrations.requires_trl import FusedDPOTrainer, datasets, trl
"""
import pytest

trl = pytest.importorskip("trl", reason="TRL is an optional extra: pip install -e '.[trl]'")
datasets = pytest.importorskip("datasets", reason="TRL's trainer needs `datasets`")

# The drop-in imports TRL itself, so it comes after the skip.
from dpo_kernels.integrations.trl import FusedDPOTrainer, patch_dpo_trainer  # noqa: E402

__all__ = ["FusedDPOTrainer", "datasets", "patch_dpo_trainer", "trl"]
