"""Checkpoint corners that a short test run never reaches: step numbers past the 8 digits of the folder
names, and optimizer states that are missing for some parameters (or all) when a checkpoint is saved.

Resuming is checked on a tiny stand-alone module in this process, for both formats and both ways of
loading: in a process group (a 1-process gloo group, as torchrun makes it) and without one."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import rmtree_dying_after_one_weight_file, tiny_config
from fusedit.checkpoints import find_checkpoint
from fusedit.train.checkpoint import (
    consolidate_checkpoint,
    load_training_state,
    save_checkpoint,
    save_distributed_checkpoint,
)
from fusedit.train.distributed import _fsdp_api
from fusedit.train.ema import EMA

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed/gloo",
)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fsynced descriptor through /proc")
def test_a_checkpoint_is_on_the_disk_before_latest_names_it(tmp_path, monkeypatch):
    """A rename is atomic against a kill, not against a crash: every file of a checkpoint is fsynced before
    its folder is renamed into place, and the rename before `latest` names it; so is `checkpoints/` itself,
    new in the run folder at the first save."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    cfg, net = tiny_config(), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    final = save_checkpoint(
        tmp_path, 5, cfg, net, net.state_dict(), opt, None, files={"data_state.json": "{}"}
    )
    root, partial = tmp_path / "checkpoints", tmp_path / "checkpoints" / ".step_00000005.partial"
    moved = events.index(("replace", str(final)))
    synced = {path for kind, path in events[:moved] if kind == "fsync"}
    files = {partial / p.relative_to(final) for p in final.rglob("*")}
    assert {"denoiser.safetensors", "ema.safetensors", "optimizer.pt", "state.json"} <= {
        p.name for p in files
    }
    assert {str(p) for p in files} | {str(partial)} <= synced
    pointed = events.index(("replace", str(root / "latest")))
    assert ("fsync", str(root)) in events[moved:pointed]  # the rename is on the disk before `latest`
    assert ("fsync", str(tmp_path)) in events[moved:pointed]
    assert events[pointed + 1 :] == [("fsync", str(root))]  # and `latest` itself before the return
    assert find_checkpoint(tmp_path) == final


def test_the_latest_checkpoint_is_the_highest_step_past_eight_digits(tmp_path):
    # step_100000000 sorts before step_99999999 by name: it must neither be pruned nor lose "latest".
    cfg, net = tiny_config(), torch.nn.Linear(2, 2)
    for step in (99_999_998, 99_999_999, 100_000_000):
        save_checkpoint(tmp_path, step, cfg, net, None, None, None, keep=2)
    root = tmp_path / "checkpoints"
    assert {p.name for p in root.iterdir()} == {"latest", "step_99999999", "step_100000000"}
    assert find_checkpoint(tmp_path).name == "step_100000000"
    (root / "latest").unlink()  # without the pointer (a run killed before writing it), the highest step
    assert find_checkpoint(tmp_path).name == "step_100000000"


class _Net(torch.nn.Module):
    """``b`` is used from step 2 on only: before that it gets no gradient, so AdamW keeps no state for it."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        y = self.a(x)
        return self.b(y) if step >= 2 else y


def _build(shard: bool = False):
    torch.manual_seed(0)
    net = _Net()
    if shard:  # FSDP2 in the 1-process group: parameters, Adam states and EMA become DTensors
        fully_shard, _ = _fsdp_api()
        fully_shard(net)
    return net, torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1), EMA(net, 0.9)


def _train(net, opt, ema, steps: range, save=None) -> None:
    for step in steps:
        if save is not None:
            save(step)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        net(x, step).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(net)


@contextlib.contextmanager
def _process_group(folder: Path):
    dist.init_process_group("gloo", store=dist.FileStore(str(folder / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _same(a, b, what: str) -> None:
    """Equal state (dicts, lists, tensors and numbers), tensors bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), what
        for k in a:
            _same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        full = [getattr(t, "full_tensor", lambda t=t: t)() for t in (a, b)]  # DTensors in full
        assert isinstance(b, torch.Tensor) and torch.equal(*full), what
    else:
        assert a == b, what


def _resume_and_check(run: Path, ref, saved_at: int, *, shard: bool, distributed: bool) -> None:
    net, opt, ema = _build(shard)
    load_training_state(find_checkpoint(run), net, {"denoiser": opt}, ema, {}, distributed=distributed)
    assert net.b.weight not in opt.state
    _train(net, opt, ema, range(saved_at, 4))
    _same(net.state_dict(), ref[0].state_dict(), "weights")
    _same(opt.state_dict(), ref[1].state_dict(), "optimizer")
    _same(ema.state_dict(), ref[2].state_dict(), "EMA")


@needs_gloo
@pytest.mark.parametrize("saved_at", [0, 2], ids=["before-any-step", "b-without-state"])
@pytest.mark.parametrize("load", ["alone", "in-group", "fsdp"])
@pytest.mark.parametrize("fmt", ["dcp", "plain"])
def test_parameters_without_adam_state_resume_exactly(tmp_path, fmt, load, saved_at):
    """A parameter that had no gradient before the save has no Adam state; resumed, it must have none
    either (not a zero state with step 1, which changes Adam's bias correction at its first update), and
    saving must not give it one. Checked against a run that never saved: weights, optimizer states and
    EMA bit for bit. "alone": loaded without a process group; "fsdp": saved (DCP) and resumed sharded."""
    ref = _build()
    _train(*ref, range(4))
    cfg = tiny_config()
    with _process_group(tmp_path):
        # A plain checkpoint is one unsharded process's.
        net, opt, ema = _build(shard=load == "fsdp" and fmt == "dcp")

        def save(step: int) -> None:
            if step != saved_at:
                return
            if fmt == "dcp":
                optimizers = {"denoiser": opt}
                save_distributed_checkpoint(
                    tmp_path, step, cfg, net, ema.state_dict(), optimizers, {}, rank=0
                )
            else:
                save_checkpoint(tmp_path, step, cfg, net, ema.state_dict(), opt, None)

        _train(net, opt, ema, range(4), save)
        _same(net.state_dict(), ref[0].state_dict(), "weights of the run that saved")
        _same(opt.state_dict(), ref[1].state_dict(), "optimizer of the run that saved")
        if load != "alone":
            _resume_and_check(tmp_path, ref, saved_at, shard=load == "fsdp", distributed=True)
    if load == "alone":
        _resume_and_check(tmp_path, ref, saved_at, shard=False, distributed=False)


@needs_gloo
@pytest.mark.parametrize("saved_at", [0, 2], ids=["before-any-step", "b-without-state"])
def test_a_dcp_checkpoint_with_missing_adam_states_consolidates_and_resumes_exactly(tmp_path, saved_at):
    """DCP writes no optimizer "state" at all for an optimizer saved before its first step: consolidate
    still writes a plain checkpoint, and it resumes as the run that never saved goes on."""
    ref = _build()
    _train(*ref, range(4))
    run = tmp_path / "run"
    with _process_group(tmp_path):
        net, opt, ema = _build()

        def save(step: int) -> None:
            if step == saved_at:
                optimizers = {"denoiser": opt}
                save_distributed_checkpoint(
                    run, step, tiny_config(), net, ema.state_dict(), optimizers, {}, rank=0
                )

        _train(net, opt, ema, range(4), save)
    plain = consolidate_checkpoint(run, tmp_path / "plain")
    _resume_and_check(plain, ref, saved_at, shard=False, distributed=False)


@needs_gloo
def test_a_consolidation_killed_while_deleting_the_one_it_replaces_leaves_no_torn_folder(
    tmp_path, monkeypatch
):
    """consolidate replaces an earlier consolidation whole: a kill while the old one is deleted (a
    deletion goes in no set order) leaves a complete folder under the output's name, never one holding a
    state.json but missing weights, and the next consolidation clears what the kill left."""
    run, out = tmp_path / "run", tmp_path / "plain"
    with _process_group(tmp_path):
        net, opt, ema = _build()
        _train(net, opt, ema, range(1))
        save_distributed_checkpoint(
            run, 1, tiny_config(), net, ema.state_dict(), {"denoiser": opt}, {}, rank=0
        )
    consolidate_checkpoint(run, out)
    with monkeypatch.context() as patch:
        _crash_at(patch, "delete")
        with pytest.raises(_Crash):
            consolidate_checkpoint(run, out)
    _assert_complete(out)
    consolidate_checkpoint(run, out)
    _assert_complete(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


class _Crash(BaseException):
    """A kill, as far as the code under test can tell: nothing catches it."""


def _net_and_optimizer():
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    return net, opt


def _assert_complete(folder: Path) -> None:
    import json

    listed = json.loads((folder / "state.json").read_text())["weight_files"]
    assert listed and [name for name in listed if not (folder / name).is_file()] == [], folder


def _crash_at(monkeypatch, point: str) -> None:
    """Make the next save_checkpoint die at ``point``."""
    import shutil

    import fusedit.files
    import fusedit.train.checkpoint as writer

    def die(*args, **kwargs):
        raise _Crash(point)

    if point == "weights":  # the temporary folder is made, its first file not written
        monkeypatch.setattr(writer, "save_file", die)
    elif point == "rename":  # every file written, the folder not synced and renamed into place
        monkeypatch.setattr(fusedit.files, "sync_tree", die)
    elif point == "latest":  # renamed into place, `latest` not yet naming it
        monkeypatch.setattr(writer, "write_text_atomic", die)
    else:  # "delete": killed while deleting a checkpoint folder, one file gone (deletion has no set order)
        monkeypatch.setattr(
            shutil, "rmtree", rmtree_dying_after_one_weight_file(shutil.rmtree, _Crash(point))
        )


@pytest.mark.parametrize("point", ["weights", "rename", "latest", "delete"])
def test_a_save_killed_at_any_point_leaves_a_complete_checkpoint_to_resume(tmp_path, monkeypatch, point):
    """state.json marks a folder complete: after a kill at any point of a save (pruning the oldest folder
    included), every step_<n> folder holding one holds all its files, the run resumes from a complete
    checkpoint, and its next save leaves no temporary folder behind (a whole checkpoint's worth of disk)."""
    from fusedit.checkpoints import checkpoint_folders

    cfg, (net, opt) = tiny_config(), _net_and_optimizer()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, cfg, net, net.state_dict(), opt, None, keep=2)
    with monkeypatch.context() as patch:
        _crash_at(patch, point)
        with pytest.raises(_Crash):
            save_checkpoint(tmp_path, 3, cfg, net, net.state_dict(), opt, None, keep=2)
    root = tmp_path / "checkpoints"
    for folder in checkpoint_folders(root):
        if (folder / "state.json").is_file():
            _assert_complete(folder)
    found = find_checkpoint(tmp_path)
    assert found.name == ("step_00000003" if point == "delete" else "step_00000002")
    fresh = torch.nn.Linear(2, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    load_training_state(found, fresh, {"denoiser": fresh_opt}, EMA(fresh, 0.9), {}, distributed=False)
    assert torch.equal(fresh.weight, net.weight)
    # The resumed run's next save (of another step: the interval may have changed) clears what the kill left.
    save_checkpoint(tmp_path, 4, cfg, net, net.state_dict(), opt, None, keep=2)
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    assert find_checkpoint(tmp_path).name == "step_00000004"


def test_a_save_killed_while_replacing_an_unnamed_save_of_its_step_keeps_the_named_one(tmp_path, monkeypatch):
    """A save renamed into place but killed before `latest` named it is saved again by the resumed run: a
    kill while that earlier copy is deleted must not leave it half deleted under its step_<n> name."""
    cfg, (net, opt) = tiny_config(), _net_and_optimizer()
    save_checkpoint(tmp_path, 1, cfg, net, net.state_dict(), opt, None)
    for point in ("latest", "delete"):
        with monkeypatch.context() as patch:
            _crash_at(patch, point)
            with pytest.raises(_Crash):
                save_checkpoint(tmp_path, 2, cfg, net, net.state_dict(), opt, None)
    assert find_checkpoint(tmp_path).name == "step_00000001"
    step2 = tmp_path / "checkpoints" / "step_00000002"
    if (step2 / "state.json").is_file():
        _assert_complete(step2)
    # Unlinked from `latest` by hand (a lost pointer): the highest complete step is found, never a torn one.
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009")
    _assert_complete(find_checkpoint(tmp_path))


@pytest.mark.parametrize(
    ("damage", "error", "named"),
    [
        ("missing denoiser.safetensors", FileNotFoundError, "lacks denoiser.safetensors"),
        ("missing ema.safetensors", FileNotFoundError, "lacks ema.safetensors"),
        ("truncated optimizer.pt", ValueError, "optimizer.pt' is not a readable optimizer state"),
        ("truncated state.json", ValueError, "state.json' is not readable JSON"),
    ],
)
def test_resuming_a_damaged_checkpoint_names_the_file(tmp_path, damage, error, named):
    """A checkpoint copy that lost or cut a file is refused naming it when a run resumes from it: a lost
    weight file must not leave its module at the fresh model's random weights."""
    cfg, (net, opt) = tiny_config(), _net_and_optimizer()
    ckpt = save_checkpoint(tmp_path, 1, cfg, net, net.state_dict(), opt, None)
    how, name = damage.split()
    if how == "missing":
        (ckpt / name).unlink()
    else:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(error, match=named) as caught:
        _resume_a_fresh_net(ckpt)
    assert "\n" not in str(caught.value)


@needs_gloo
@pytest.mark.parametrize("damage", ["missing shard", "truncated shard", "truncated metadata"])
def test_resuming_a_damaged_dcp_checkpoint_names_it_in_one_line(tmp_path, damage):
    """DCP's own error is every rank's traceback, and pickle's says only "truncated": a copy of a
    distributed checkpoint that lost or cut a file is named in one line."""
    net, opt = _net_and_optimizer()
    with _process_group(tmp_path):
        ckpt = save_distributed_checkpoint(
            tmp_path / "run", 1, tiny_config(), net, net.state_dict(), {"denoiser": opt}, {}, rank=0
        )
    how, what = damage.split()
    path = ckpt / "dcp" / ".metadata" if what == "metadata" else next((ckpt / "dcp").glob("*.distcp"))
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:100])
    named = re.escape(str(path if what == "metadata" else ckpt / "dcp"))
    with pytest.raises(ValueError, match=named) as caught:
        _resume_a_fresh_net(ckpt)
    assert "\n" not in str(caught.value)


def _resume_a_fresh_net(ckpt):
    """load_training_state of ``ckpt`` (saved from _net_and_optimizer) into a fresh net, optimizer and EMA."""
    fresh = torch.nn.Linear(2, 2)
    opts = {"denoiser": torch.optim.AdamW(fresh.parameters())}
    return load_training_state(ckpt, fresh, opts, EMA(fresh, 0.9), {}, distributed=False)


def test_a_damaged_vocabulary_file_is_named_in_one_line(tmp_path):
    """A copy that cut vocabulary.json short is refused naming the file, as a damaged state.json is, not
    with json's bare "Expecting ..." (the words fix the built-in tokenizer's ids)."""
    from fusedit.checkpoints import VOCABULARY_FILE, saved_vocabulary

    path = tmp_path / VOCABULARY_FILE
    path.write_text('["a", "red"')
    with pytest.raises(ValueError) as caught:
        saved_vocabulary(tmp_path)
    assert str(caught.value) == (
        f"{str(path)!r} is not readable JSON (Expecting ',' delimiter: line 1 column 12 (char 11); "
        "a damaged copy? copy the checkpoint again)"
    )


def _refuse_writing(monkeypatch, writer: str, name: str, error: BaseException) -> None:
    """Make the next save's writer ``writer`` raise ``error`` when it writes the file ``name``: what a
    full disk does to it (safetensors' save_file, torch.save, or a plain file write)."""
    import fusedit.train.checkpoint as checkpoint

    real = {"save_file": checkpoint.save_file, "torch.save": torch.save, "write_text": Path.write_text}[
        writer
    ]

    def refuse(*args, **kwargs):
        target = args[0] if writer == "write_text" else args[1]
        if Path(target).name == name:
            raise error
        return real(*args, **kwargs)

    where = {
        "save_file": (checkpoint, "save_file"),
        "torch.save": (torch, "save"),
        "write_text": (Path, "write_text"),
    }
    monkeypatch.setattr(*where[writer], refuse)


@pytest.mark.parametrize(
    ("writer", "name", "error", "detail"),
    [
        (
            "save_file",
            "ema.safetensors",
            "SafetensorError: Error while serializing: I/O error: No space left on device (os error 28)",
            "I/O error: No space left on device (os error 28)",
        ),
        (
            "torch.save",
            "optimizer.pt",
            "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 1720448 vs 1720336",
            "torch's writer stopped short, as on a full disk: unexpected pos 1720448 vs 1720336",
        ),
        ("write_text", "data_state.json", "OSError: 28", "No space left on device"),
    ],
    ids=["safetensors", "torch.save", "text-file"],
)
def test_a_save_the_disk_refuses_frees_its_folder_and_says_so_in_one_line(
    tmp_path, monkeypatch, writer, name, error, detail
):
    """A full disk mid-save (each writer words it its own way): the half-written .step_N.partial goes, so
    the space is back and the last complete checkpoint stays the latest, and the error is one line naming
    the file, the folder, what a checkpoint takes there and what to do."""
    import errno

    from safetensors import SafetensorError

    from fusedit.files import readable_size
    from fusedit.train.checkpoint import CheckpointNotSaved

    kind, _, text = error.partition(": ")
    raised = {
        "SafetensorError": SafetensorError(text),
        "RuntimeError": RuntimeError(text),
        "OSError": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    }[kind]
    cfg, (net, opt) = tiny_config(), _net_and_optimizer()
    for step in (1, 2):
        save_checkpoint(
            tmp_path, step, cfg, net, net.state_dict(), opt, None, files={"data_state.json": "{}"}
        )
    root = tmp_path / "checkpoints"
    size = sum(f.stat().st_size for f in (root / "step_00000002").iterdir())
    with monkeypatch.context() as patch:
        _refuse_writing(patch, writer, name, raised)
        with pytest.raises(CheckpointNotSaved) as e:
            save_checkpoint(
                tmp_path, 3, cfg, net, net.state_dict(), opt, None, files={"data_state.json": "{}"}
            )
    assert str(e.value) == (
        f"checkpoint step 3 was not saved: writing {name} in {str(root)!r} failed ({detail}); its partial "
        f"folder is deleted (a checkpoint takes about {readable_size(size)} here, and train.keep_checkpoints=2 "
        "of them stay beside the one being saved): free disk space there"
    )
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert find_checkpoint(tmp_path).name == "step_00000002"
    _assert_complete(root / "step_00000002")


def test_a_save_that_fails_once_in_place_says_it_is_saved_and_a_refusal_names_its_own_remedy(
    tmp_path, monkeypatch
):
    """A failure after the folder is renamed into place (pointing `latest` at it) leaves a complete
    checkpoint: not "not saved", nor its folder deleted. A permission or read-only refusal is no full disk."""
    import errno

    import fusedit.train.checkpoint as checkpoint
    from fusedit.train.checkpoint import CheckpointNotSaved

    cfg, (net, opt) = tiny_config(), _net_and_optimizer()
    root = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, 1, cfg, net, net.state_dict(), opt, None)
    real = checkpoint.write_text_atomic

    def full_at_latest(path, *args, **kwargs):
        if Path(path).name == "latest":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_text_atomic", full_at_latest)
    with pytest.raises(CheckpointNotSaved) as e:
        save_checkpoint(tmp_path, 2, cfg, net, net.state_dict(), opt, None)
    assert str(e.value) == (
        f"checkpoint step 2 is saved in {str(root)!r}, but finishing the save failed (No space left on "
        "device): 'latest' may still name the one before, which a --resume then takes; free disk space there"
    )
    _assert_complete(root / "step_00000002")
    assert find_checkpoint(tmp_path).name == "step_00000001"
    monkeypatch.setattr(checkpoint, "write_text_atomic", real)
    for code, remedy in (
        (errno.EACCES, "this user may not write there: check the folder's permissions"),
        (errno.EROFS, "the file system is read-only: train into a writable folder"),
        (errno.EIO, "check the file system there"),
    ):
        with monkeypatch.context() as patch:
            _refuse_writing(patch, "save_file", "ema.safetensors", OSError(code, os.strerror(code)))
            with pytest.raises(CheckpointNotSaved) as e:
                save_checkpoint(tmp_path, 3, cfg, net, net.state_dict(), opt, None)
        assert str(e.value).endswith(f"stay beside the one being saved): {remedy}"), code


def test_a_first_save_the_disk_refuses_and_a_bug_in_a_save_keep_their_own_words(tmp_path, monkeypatch):
    """With no checkpoint before it there is no size to tell; an error that is not the file system's (a
    bug) keeps its own type and traceback, and its partial folder goes all the same."""
    from safetensors import SafetensorError

    from fusedit.train.checkpoint import CheckpointNotSaved

    cfg, (net, opt) = tiny_config(), _net_and_optimizer()
    root = tmp_path / "checkpoints"
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with monkeypatch.context() as patch:
        _refuse_writing(patch, "save_file", "denoiser.safetensors", full)
        with pytest.raises(CheckpointNotSaved) as e:
            save_checkpoint(tmp_path, 1, cfg, net, net.state_dict(), opt, None)
    assert str(e.value) == (
        f"checkpoint step 1 was not saved: writing denoiser.safetensors in {str(root)!r} failed (I/O error: "
        "No space left on device (os error 28)); its partial folder is deleted: free disk space there"
    )
    for bug in (RuntimeError("boom"), SafetensorError("Error while serializing: tensor is not contiguous")):
        with monkeypatch.context() as patch:
            _refuse_writing(patch, "save_file", "ema.safetensors", bug)
            with pytest.raises(type(bug)) as e:
                save_checkpoint(tmp_path, 1, cfg, net, net.state_dict(), opt, None)
        assert e.value is bug
        assert list(root.iterdir()) == []


@needs_gloo
def test_a_distributed_save_the_disk_refuses_frees_its_folder_and_says_so_in_one_line(tmp_path, monkeypatch):
    """DCP gathers each rank's failed write into a CheckpointException (not an OSError, nor a
    RuntimeError): a refused write in it is the same one line, and the partial folder goes."""
    import errno

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from fusedit.train.checkpoint import CheckpointNotSaved

    def full(*args, **kwargs):
        raise CheckpointException(
            "save failed", {0: (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), None)}
        )

    cfg, (net, opt) = tiny_config(), _net_and_optimizer()
    monkeypatch.setattr(dcp, "save", full)
    with _process_group(tmp_path), pytest.raises(CheckpointNotSaved) as e:
        save_distributed_checkpoint(
            tmp_path / "run", 1, cfg, net, net.state_dict(), {"denoiser": opt}, {}, rank=0
        )
    root = tmp_path / "run" / "checkpoints"
    assert str(e.value) == (
        f"checkpoint step 1 was not saved: writing dcp in {str(root)!r} failed (No space left on device); its "
        "partial folder is deleted: free disk space there"
    )
    assert list(root.iterdir()) == []


def test_the_share_of_the_start_an_ema_holds_follows_each_stage_up_to_the_step():
    """The EMA starts as a copy of the run's first weights and keeps ema_decay of them at each update
    (after every ema_every-th step, at the settings of the stage the step falls in): what an early
    checkpoint's EMA still holds of its random init, sample and export warn on (cli.common._warn_early_ema),
    and at the run's end what the training warns on."""
    from fusedit.checkpoints import ema_start_share

    plain = tiny_config(train={"steps": 2000, "ema_decay": 0.998, "ema_every": 1})
    assert ema_start_share(plain, 0) == 1.0
    assert ema_start_share(plain, 120) == pytest.approx(0.998**120)  # 79%: noise, sampled as the model
    # The updates come after steps 2, 4, ... (0.9) in the first stage, 12, 15, 18 (0.5) in the second.
    staged = tiny_config(
        stages=[
            {"name": "a", "steps": 10, "train": {"ema_decay": 0.9, "ema_every": 2}},
            {"name": "b", "steps": 10, "train": {"ema_decay": 0.5, "ema_every": 3}},
        ]
    )
    assert ema_start_share(staged, 5) == pytest.approx(0.9**2)
    assert ema_start_share(staged, 10) == pytest.approx(0.9**5)
    assert ema_start_share(staged, 15) == pytest.approx(0.9**5 * 0.5**2)
    assert ema_start_share(staged, 20) == ema_start_share(staged, 99) == pytest.approx(0.9**5 * 0.5**3)
