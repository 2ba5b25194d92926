"""So-ViT Pipeline: config, distributed setup, engine, checkpointing and tracking around the So-ViT models."""
