"""Datasets: the procedural shapes world (the built-in default), image folders, Hugging Face datasets,
webdataset shards and pre-encoded latents, all behind one step-indexed loader (``loader``)."""
