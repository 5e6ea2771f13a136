"""Constants shared by every part of the package."""

# The label that marks a position as not scored (prompt, padding): HuggingFace's and PyTorch's convention.
IGNORE_INDEX = -100
