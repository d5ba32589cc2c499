"""Named YAML presets; experiments are small override files on top of them (``base: <preset>``)."""
