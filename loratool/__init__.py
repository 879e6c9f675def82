"""loratool: inspect, convert, extract, resize, mix, merge and train LoRA adapters."""

__version__ = "0.1.0"
