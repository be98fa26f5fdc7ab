"""Synthetic evaluation tasks mirroring the ReSSFormer paper's figures."""
