"""The procedural shapes world: its dataset, its pixel-level evaluator, and the default model's recipe."""
