"""convmodel: pretrain language models with PyTorch Lightning, alone or in a hivemind swarm."""

__version__ = "0.1.0"
