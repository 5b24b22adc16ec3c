"""Opt-in speed and memory paths, applied to the models from outside (models/ never imports this)."""
