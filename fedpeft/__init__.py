"""fedpeft: federated parameter-efficient fine-tuning (LoRA) on Flower."""

__version__ = "0.1.0"
