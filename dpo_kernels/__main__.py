"""`python -m dpo_kernels ...` is the `dpo-kernels` command."""
import sys

from dpo_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main())
