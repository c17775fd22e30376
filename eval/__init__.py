"""Evaluation of erased models: NudeNet on I2P prompts, FID, class accuracy."""

__all__: list[str] = []
