"""sft-ray: supervised fine-tuning at cluster scale (Ray Data -> Ray Train + TRL + DeepSpeed -> export -> eval)."""

__version__ = "0.1.0"
