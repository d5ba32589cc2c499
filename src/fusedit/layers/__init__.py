"""Building blocks shared by every design: attention, rotary embeddings, modulation, MLPs, patches."""
