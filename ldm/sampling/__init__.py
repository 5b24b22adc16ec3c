"""Noise schedules, the sampling plan, denoisers, guidance and samplers as pure functions."""
