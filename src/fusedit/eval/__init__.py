"""Evaluation of generated images: programmatic verifiers and benchmark scoring."""
