"""Shared flax.linen layers; every parameter carries logical axis names (see fmjax/sharding.py)."""
