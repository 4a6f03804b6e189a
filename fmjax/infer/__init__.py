"""Inference: sampling from trained models."""
