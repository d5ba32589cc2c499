"""Training: ``loop.train(cfg, run_dir)`` is what `fusedit train` runs (the loop, top to bottom), with a
step's randomness (``seeding``), stages and their optimizers (``stages``), the EMA (``ema``), checkpoints
(``checkpoint``), the run folder (``run_folder``), the data position (``data_state``), torchrun
(``distributed``) and metric loggers (``loggers``). Nothing is imported here: ``fusedit.train.ema`` alone
does not bring in the loop."""
