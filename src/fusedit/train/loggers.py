"""Optional metric loggers next to the always-on ``metrics.jsonl``: TensorBoard and Weights & Biases
(``train.loggers``). Rank 0 alone logs. Each package is imported only when a run asks for it, and a missing
one fails the run before training with a one-line error naming the pip package.

Both see exactly the records ``metrics.jsonl`` gets (loss, grad_norm, lr, sec, a staged run's stage and
llm_lr, and from the first prompt cut to text.max_length the run's count of them, truncated), as scalars
``train/<name>`` at the record's step. A resumed run continues where its checkpoint
was: TensorBoard hides what the interrupted run logged past it (``purge_step``, as metrics.jsonl is rewound),
and wandb continues the same run (its id is kept in the run folder; wandb itself ignores steps it has).
"""

from __future__ import annotations

import importlib
import os
import uuid
from pathlib import Path

from fusedit.config import Config, ConfigError, to_dict

# The module each logger imports, by its train.loggers name (the pip package has the name).
_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}


def check_loggers(cfg: Config) -> None:
    """That each logger ``train.loggers`` names can be imported, before the run folder is made: a missing
    package otherwise failed after the folder, its lock and the earlier loggers' files were there."""
    for name in cfg.train.loggers:
        try:
            importlib.import_module(_MODULES[name])
        except ImportError:
            raise ConfigError(
                f"train.loggers names {name}, which is not installed: pip install {name}"
            ) from None


def _scalars(record: dict) -> dict[str, float]:
    return {
        f"train/{k}": float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class TensorBoardLogger:
    """Event files in ``run_dir/tensorboard`` (``tensorboard --logdir RUN/tensorboard``)."""

    def __init__(self, run_dir: Path, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter  # installed: check_loggers

        purge = None if resumed_at is None else resumed_at + 1  # the first step this run logs
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, record: dict, step: int) -> None:
        for tag, value in _scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """One wandb run per run folder: project $WANDB_PROJECT (default "fusedit"), named after the config,
    with the resolved config attached; $WANDB_MODE=offline logs without a network (``wandb sync`` later)."""

    ID_FILE = "wandb_run_id"

    def __init__(self, run_dir: Path, cfg: Config, resumed_at: int | None):
        import wandb  # installed: check_loggers

        id_file = run_dir / self.ID_FILE
        resumed = resumed_at is not None and id_file.is_file()
        run_id = id_file.read_text().strip() if resumed else uuid.uuid4().hex[:16]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fusedit"),
            name=cfg.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=to_dict(cfg),
        )

    def log(self, record: dict, step: int) -> None:
        self.run.log(_scalars(record), step=step)

    def close(self) -> None:
        self.run.finish()


def open_loggers(cfg: Config, run_dir: Path, resumed_at: int | None) -> list:
    """The loggers ``train.loggers`` names; ``resumed_at`` is the step a resumed run continues from."""
    check_loggers(cfg)  # every package before any logger opens
    out = []
    try:
        for name in cfg.train.loggers:
            out.append(
                TensorBoardLogger(run_dir, resumed_at)
                if name == "tensorboard"
                else WandbLogger(run_dir, cfg, resumed_at)
            )
    except BaseException:
        for logger in out:
            logger.close()
        raise
    return out
