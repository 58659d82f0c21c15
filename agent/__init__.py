"""studio-agent: supervises a data studio's IDE and checkpoints its root filesystem."""

__version__ = "0.1.0"
