"""raysft: supervised fine-tuning of language models on Ray (Ray Data + Ray Train + TRL)."""

__version__ = "0.1.0"
