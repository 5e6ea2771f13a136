"""The integration tests build their tiny models and tokenizers locally: transformers, TRL and datasets must not
reach the Hub. Set here, before any test module imports them."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
