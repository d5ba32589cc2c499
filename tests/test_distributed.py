"""Distributed training on 2 CPU processes (gloo), launched the way users launch it: torchrun running
``python -m fusedit train``. The runs are tiny (conftest.TINY) and shared between tests (module fixtures).

What must hold: splitting a global batch over processes or micro-steps changes the losses only by float
rounding; DDP and FSDP2 train the same model; a checkpoint written by 2 processes resumes on 1 (and the other
way round) and samples without a process group; a run SIGKILLed at random moments, mid-save included,
loses at most one checkpoint interval and ends with the losses of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from conftest import tiny_config
from fusedit.checkpoints import find_checkpoint, is_distributed_checkpoint, load_model, load_state
from fusedit.cli import main
from fusedit.config import ConfigError, save_config
from fusedit.train.distributed import DistEnv, resolve_parallel
from fusedit.train.loop import train

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed/gloo",
)

LAUNCH_TIMEOUT = 240  # seconds for one torchrun launch (import + 6 tiny steps take ~10 s on 2 busy cores)
# Float tolerance between differently split runs (one process vs two, micro-steps, DDP vs FSDP): the
# reductions differ in order only.
TOL = {"rel": 1e-5, "abs": 1e-6}

_DIST_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("TORCHELASTIC")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _config(path: Path, **train) -> Path:
    save_config(tiny_config(train={"device": "cpu", **train}), path)
    return path


def _run(cmd: list[str], env: dict, timeout: float = LAUNCH_TIMEOUT) -> str:
    """Run to completion in its own session (so a timeout ends every process it started); its output."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-4000:]}"
    return out


def torchrun(nproc: int, config: Path, out: Path, *args: str) -> Path:
    train_log(nproc, config, out, *args)
    return out


def train_log(nproc: int, config: Path, out: Path, *args: str) -> str:
    """``fusedit train`` under torchrun on ``nproc`` CPU processes; what it printed (stdout and stderr)."""
    for attempt in range(3):
        # A port found free can be taken by another process before torchrun binds it: only that failure
        # is retried, with a new port; any other failure fails the test at once.
        port = str(_free_port())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        cmd += ["--master_addr", "127.0.0.1", "--master_port", port, "-m", "fusedit", "train", str(config)]
        try:
            return _run(
                [*cmd, "--out", str(out), "--quiet", *args], _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            )
        except AssertionError as e:
            if attempt == 2 or "address already in use" not in str(e).lower():
                raise
    raise AssertionError("not reached: the last attempt returns or raises")


def logged_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _keep_until(run_dir: Path, step: int) -> None:
    """Make ``step`` the run's latest checkpoint, as if the run had been interrupted right after it."""
    (run_dir / "checkpoints" / "latest").write_text(f"step_{step:08d}")


def _weights_close(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-5) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=atol, rtol=1e-4), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders made once: "ref" one process x 8 samples (in this process); the others are torchrun
    launches built lazily by ``runs(name)``."""
    root = tmp_path_factory.mktemp("dist")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in made:
            return made[name]
        if name == "ref":  # one process, batch 8; a preview grid at the last step
            cfg = tiny_config(train={"batch_size": 8, "preview_every": 6})
            made[name] = train(cfg, root / name, progress=False)["run_dir"]
        elif name == "ddp":  # two processes x batch 4 = the same global batch
            made[name] = torchrun(2, _config(root / "ddp.yaml", batch_size=4, preview_every=6), root / name)
        elif name == "fsdp":  # two processes x 2 micro-steps x batch 2, the LLM sharded too
            cfg = _config(root / "fsdp.yaml", batch_size=2, grad_accum=2, parallel="fsdp", shard_llm=True)
            made[name] = torchrun(2, cfg, root / name)
        elif name == "ref-bf16":
            cfg = tiny_config(train={"batch_size": 8, "precision": "bf16"})
            made[name] = train(cfg, root / name, progress=False)["run_dir"]
        elif name == "fsdp-bf16":  # bf16 parameters all-gathered, fp32 gradient reduction
            cfg = _config(root / "fsdp-bf16.yaml", batch_size=4, parallel="fsdp", precision="bf16")
            made[name] = torchrun(2, cfg, root / name)
        return made[name]

    return get


def test_a_sharded_llm_under_compile_trains_as_one_process_does(runs, tmp_path):
    """train.shard_llm with train.compile: the compiled LLM and its compiled K/V read (TextEncoder.compile_kv)
    read the FSDP units' gathered weights, which are resharded after every prompt batch."""
    cfg = _config(tmp_path / "c.yaml", batch_size=4, shard_llm=True, compile="aot_eager")
    two = torchrun(2, cfg, tmp_path / "run")
    assert logged_losses(two) == pytest.approx(logged_losses(runs("ref")), **TOL)


def test_two_processes_match_one_process_with_the_same_global_batch(runs, tmp_path):
    ref = logged_losses(runs("ref"))
    two = runs("ddp")
    assert logged_losses(two) == pytest.approx(ref, **TOL)
    ckpt = find_checkpoint(two)
    assert is_distributed_checkpoint(ckpt) and ckpt.name == "step_00000006"
    assert {"data_state.json", "data_state.rank1.json", "state.json", "config.yaml"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert load_state(ckpt)["world_size"] == 2
    # The preview grid shows the global batch's first 8 captions at any world size, not rank 0's 4 alone.
    grids = [np.asarray(Image.open(run / "previews" / "step_00000006.png")) for run in (runs("ref"), two)]
    assert grids[0].shape == grids[1].shape
    assert np.abs(grids[0].astype(int) - grids[1].astype(int)).mean() < 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [
        "latest",
        "step_00000003",
        "step_00000006",
    ]
    # Gradient accumulation in one process: 2 micro-steps x 4 samples are the same global batch of 8.
    accum = train(tiny_config(train={"batch_size": 4, "grad_accum": 2}), tmp_path / "accum", progress=False)
    assert accum["losses"] == pytest.approx(ref, **TOL)


def test_fsdp_matches_ddp_and_its_checkpoint_loads_in_one_process(runs):
    fsdp = runs("fsdp")
    assert logged_losses(fsdp) == pytest.approx(logged_losses(runs("ddp")), **TOL)
    sharded, _, ckpt = load_model(fsdp)  # no process group here: DCP reassembles the shards
    assert is_distributed_checkpoint(ckpt)
    replicated, _, _ = load_model(runs("ddp"))
    _weights_close(sharded.denoiser, replicated.denoiser)
    _weights_close(sharded.text.llm, replicated.text.llm, atol=0)  # frozen: saved sharded, unchanged


def test_fsdp_mixed_precision_matches_bf16_autocast_in_one_process(runs):
    # One process: fp32 weights under bf16 autocast. FSDP2: bf16 copies of the weights all-gathered (the
    # same rounding autocast applies at each matmul), gradients reduced in fp32.
    assert logged_losses(runs("fsdp-bf16")) == pytest.approx(logged_losses(runs("ref-bf16")), rel=1e-4)


def test_a_two_process_checkpoint_resumes_on_one_process(runs, tmp_path, capsys, caplog):
    ref = runs("ref")
    run = tmp_path / "run"
    shutil.copytree(runs("ddp"), run)
    _keep_until(run, 3)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        rest = train(tiny_config(train={"batch_size": 8}), run, resume=True, progress=False)
    assert not [r for r in caplog.records if "global batch" in r.getMessage()]  # the same one: nothing to say
    caplog.clear()
    assert rest["losses"] == pytest.approx(logged_losses(ref)[3:], **TOL)
    assert logged_losses(run) == pytest.approx(logged_losses(ref), **TOL)
    _weights_close(load_model(run)[0].denoiser, load_model(ref)[0].denoiser)
    # What sampling loads (EMA weights) from a checkpoint of 2 processes, and from its plain consolidation.
    from_dcp, _, ckpt = load_model(runs("ddp"))
    assert is_distributed_checkpoint(ckpt)
    _weights_close(from_dcp.denoiser, load_model(ref)[0].denoiser)
    plain = tmp_path / "plain"
    assert main(["consolidate", str(runs("ddp")), "--out", str(plain)]) == 0
    assert not is_distributed_checkpoint(plain)
    # a plain checkpoint has nothing to consolidate: one line says so
    assert main(["consolidate", str(plain), "--out", str(tmp_path / "again")]) == 2
    assert "is not a distributed (DCP) checkpoint" in capsys.readouterr().err
    assert {"denoiser.safetensors", "ema.safetensors", "llm.safetensors", "optimizer.pt"} <= {
        p.name for p in plain.iterdir()
    }
    # Each rank's data position, as the run's state keeps its world size of 2.
    for name in ("data_state.json", "data_state.rank1.json"):
        assert (plain / name).read_bytes() == (find_checkpoint(runs("ddp")) / name).read_bytes()
    from_plain, _, _ = load_model(plain)
    for k, v in from_dcp.denoiser.state_dict().items():
        assert torch.equal(v, from_plain.denoiser.state_dict()[k]), k

    # Relaunched on fewer processes with the per-process batch unchanged (after a lost node, say): the
    # global batch halves, which only an INFO line said.
    halved = tmp_path / "halved"
    shutil.copytree(runs("ddp"), halved)
    _keep_until(halved, 3)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        train(tiny_config(train={"batch_size": 4}), halved, resume=True, stop_at=4, progress=False)
    assert [r.getMessage() for r in caplog.records if "global batch" in r.getMessage()] == [
        "resuming at a global batch of 4 (1 process(es) x batch_size 4 x grad_accum 1), not the 8 the "
        "checkpoint trained at (2 x 4 samples): the rest of the run trains at another batch (to keep 8: "
        "train.batch_size=8)"
    ]


def test_a_one_process_checkpoint_resumes_sharded_on_two(runs, tmp_path):
    ref = runs("ref")
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    _keep_until(run, 3)
    torchrun(2, _config(tmp_path / "fsdp.yaml", batch_size=4, parallel="fsdp"), run, "--resume")
    assert logged_losses(run) == pytest.approx(logged_losses(ref), **TOL)
    assert is_distributed_checkpoint(find_checkpoint(run))


def test_consolidate_refuses_to_replace_a_folder_it_did_not_write(runs, tmp_path, capsys):
    run = runs("ddp")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["consolidate", str(run), "--out", str(run)]) == 2  # the run folder itself
    assert "already exists and is not a checkpoint that consolidate wrote" in capsys.readouterr().err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert main(["consolidate", str(run), "--out", str(other)]) == 2
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    inside = run / "checkpoints" / "plain"  # beside the step folders, which pruning and --overwrite delete
    assert main(["consolidate", str(run), "--out", str(inside)]) == 2
    assert "is inside the run's checkpoints folder" in capsys.readouterr().err and not inside.exists()
    # A step folder copied out of its run (downloaded, say) consolidates beside itself.
    shutil.copytree(find_checkpoint(run), tmp_path / "dl" / "step")
    assert main(["consolidate", str(tmp_path / "dl" / "step"), "--out", str(tmp_path / "dl" / "plain")]) == 0
    plain = tmp_path / "plain"
    plain.mkdir()  # an empty folder holds nothing to lose
    assert main(["consolidate", str(run), "--out", str(plain)]) == 0
    assert main(["consolidate", str(run), "--out", str(plain)]) == 0  # an earlier consolidation is replaced
    assert load_state(plain)["step"] == 6


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_previews_are_refused_where_rank_0_lacks_the_whole_model(tmp_path, parallel):
    # A preview runs on rank 0 alone: a sharded LLM (shard_llm) or DiT (fsdp) would leave it waiting for
    # the other ranks' shards until the collective timeout. A 1-process group shows the check.
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        train_cfg = {
            "device": "cpu",
            "parallel": parallel,
            "shard_llm": parallel == "ddp",
            "preview_every": 2,
        }
        with pytest.raises(ConfigError, match=r"^train.preview_every needs the whole (LLM|model) on rank 0"):
            train(tiny_config(train=train_cfg), tmp_path / "run", progress=False)
    finally:
        dist.destroy_process_group()


def test_parallel_none_refuses_several_processes():
    env = DistEnv(rank=0, world_size=2, distributed=True)
    with pytest.raises(ConfigError, match="train.parallel=none with 2 processes"):
        resolve_parallel("none", env)
    assert resolve_parallel("fsdp", DistEnv()) == "none"  # one plain process: nothing to spread


# --------------------------------------------------------------------------------------------------
# Kill -9 at random moments


def _complete_steps(run_dir: Path) -> int:
    """The last step whose metrics line was written whole (0 before the file exists, and after a launch that
    found no checkpoint to resume deleted it)."""
    last = 0
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    for line in text.splitlines():
        try:
            last = json.loads(line)["step"]
        except json.JSONDecodeError:
            break
    return last


def _checkpoint_step(run_dir: Path) -> int:
    try:
        return int(load_state(find_checkpoint(run_dir))["step"])
    except FileNotFoundError:
        return 0


def _saving(run_dir: Path) -> bool:
    try:
        return any(e.name.endswith(".partial") for e in os.scandir(run_dir / "checkpoints"))
    except FileNotFoundError:
        return False


_SLOW_PUBLISH = """
import time
from fusedit.cli import main
from fusedit.train import checkpoint
publish = checkpoint._publish
def slow_publish(*args, **kwargs):
    time.sleep(0.3)
    publish(*args, **kwargs)
checkpoint._publish = slow_publish
raise SystemExit(main())
"""


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this test started (it may have ended by itself already)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait(condition, proc: subprocess.Popen, timeout: float, poll: float) -> bool:
    """Poll until ``condition()`` or the process ends; False when it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if condition():
            return True
        if time.monotonic() > deadline:
            _kill(proc)
            pytest.fail(f"no progress in {timeout}s")
        time.sleep(poll)
    return False


@pytest.mark.parametrize("fmt", ["plain", "dcp"])
def test_training_killed_at_random_moments_resumes_with_the_uninterrupted_losses(tmp_path, fmt):
    steps, every = 12, 2
    cfg = tiny_config(train={"steps": steps, "checkpoint_every": every, "device": "cpu"})
    reference = train(cfg, tmp_path / "ref", progress=False)["losses"]
    config = tmp_path / "cfg.yaml"
    save_config(cfg, config)
    run = tmp_path / "run"
    rng = random.Random(f"kill-{fmt}")
    partial_seen, kills = [], 0
    for attempt, moment in enumerate(["random", "save", "random", "end"]):
        # "dcp": the torchrun environment of a 1-process job, so checkpoints go through DCP's collective path.
        # Port 0: the lone rank's store binds a free port itself (no other rank needs to find it), so no
        # other process can take the port between choosing and binding it.
        extra = {}
        if fmt == "dcp":
            extra = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        args = ["train", str(config), "--out", str(run), "--quiet"] + (["--resume"] if attempt else [])
        # The "save" launch holds every complete checkpoint folder 0.3 s before it is renamed into place: a
        # tiny model saves in milliseconds, and a test process descheduled on a busy machine could otherwise
        # miss every window in which a kill lands mid-save.
        launch = ["-c", _SLOW_PUBLISH] if moment == "save" else ["-m", "fusedit"]
        proc = subprocess.Popen(
            [sys.executable, *launch, *args],
            env=_env(**extra),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            if moment != "end":
                # Wait until it trains past what the last launch had logged (before that, a resumed launch is
                # still starting up and the metrics are the last launch's): to a random step, then a random
                # moment within the next steps, or the moment a checkpoint folder is being written (spinning:
                # a tiny model's save takes milliseconds).
                logged = _complete_steps(run)
                target = min(logged + rng.randint(1, 3), steps - 1) if moment == "random" else logged + 1
                if _wait(lambda k=target: _complete_steps(run) >= k, proc, LAUNCH_TIMEOUT, 0.002):
                    if moment == "save":
                        caught = _wait(lambda: _saving(run), proc, LAUNCH_TIMEOUT, 0.002)
                    else:
                        caught = True
                        time.sleep(rng.uniform(0, 0.05))
                    _kill(proc)
                    kills += caught
            proc.wait(timeout=LAUNCH_TIMEOUT)
        finally:
            if proc.poll() is None:
                _kill(proc)
                proc.wait()
        partial_seen.append(_saving(run))
        if moment != "end":
            # At most one checkpoint interval lost: every step logged before the kill is at most `every`
            # past the checkpoint the next launch resumes from.
            assert _complete_steps(run) - _checkpoint_step(run) <= every
    assert kills == 3 and _checkpoint_step(run) == steps
    assert logged_losses(run) == pytest.approx(reference, **TOL)
    assert not _saving(run)  # the resumed run rewrote and renamed it
    assert any(partial_seen), "no kill landed while a checkpoint was being written"
