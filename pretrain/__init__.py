"""Pretraining entry points and their helpers (DeepSpeed trainer, data pipeline, launch environment)."""
