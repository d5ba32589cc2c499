"""Datasets: the procedural shapes world (the built-in default)."""
