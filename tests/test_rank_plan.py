"""Bucket planning split over the ranks: each reads its share of the headers, all end with one plan."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedit.config import ConfigError, DataConfig
from fusedit.data import loader
from fusedit.data.transforms import SampleDecoder
from test_plan_scale import ROWS as PLAN_ROWS
from test_plan_scale import _folder as _plan_folder

# test_plan_scale's rows and one more wide image: 10 samples, so 3 ranks read shares of 3, 3 and 4.
ROWS = [*PLAN_ROWS, ("h.png", 50, 30, "wide once more")]


def _folder(root: Path, sizes: bool) -> DataConfig:
    return _plan_folder(root, sizes, ROWS)


class _Gather:
    """An in-process all-gather over ``world`` threads standing for the ranks (rank order)."""

    def __init__(self, world: int):
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world, timeout=30)
        self.sent: list = [None] * world

    def for_rank(self, rank: int):
        def gather(obj):
            self.slots[rank] = self.sent[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()  # everyone has read the slots before any rank gathers again
            return out

        return gather


def _ranks(world: int, work) -> list:
    """``work(rank, gather)`` run by ``world`` threads at once; their results (or errors) in rank order."""
    exchange = _Gather(world)
    out: list = [None] * world

    def run(rank):
        try:
            out[rank] = work(rank, exchange.for_rank(rank))
        except Exception as e:  # noqa: BLE001 - the test compares each rank's error
            out[rank] = e

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def _reading(catalog, rank: int, reads: dict):
    """``catalog`` with its reads counted per rank (which samples each one opened)."""
    record = catalog.record

    def counted(i):
        reads.setdefault(rank, []).append(i)
        return record(i)

    catalog.record = counted
    return catalog


@pytest.mark.parametrize("sizes", [False, True], ids=["headers", "known-sizes"])
@pytest.mark.parametrize("world", [2, 3, 12])
def test_a_split_plan_is_the_plan_of_one_process(tmp_path, sizes, world):
    cfg = _folder(tmp_path, sizes)
    decoder = SampleDecoder.from_config(cfg, 0)
    groups, events = loader.bucket_groups(loader.build_catalog(cfg), decoder)
    # The corrupt file is found from its header; known sizes never open it.
    assert groups.tolist() == (
        [1, 2, 0, 0, 1, -1, -1, 2, 0, 1] if sizes else [1, 2, 0, -1, 1, -1, -1, 2, 0, 1]
    )
    assert [e[0] for e in events] == (["tiny", "no-caption"] if sizes else ["corrupt", "tiny", "no-caption"])
    reads: dict = {}

    def plan(rank, gather):
        catalog = _reading(loader.build_catalog(cfg), rank, reads)
        return loader.bucket_groups(catalog, decoder, rank=rank, world_size=world, gather=gather)

    for rank_groups, rank_events in _ranks(world, plan):
        assert rank_groups.dtype == groups.dtype and rank_groups.tobytes() == groups.tobytes()
        assert rank_events == events
    # Each rank read its contiguous share, every sample read once (12 ranks: two read nothing).
    n = len(ROWS)
    assert {r: sorted(i) for r, i in reads.items()} == {
        r: list(range(n * r // world, n * (r + 1) // world))
        for r in range(world)
        if n * r // world < n * (r + 1) // world
    }


def test_the_shares_exchanged_are_arrays_not_a_record_per_sample(tmp_path):
    cfg = _folder(tmp_path, sizes=False)
    decoder = SampleDecoder.from_config(cfg, 0)
    exchange = _Gather(2)

    def plan(rank, _):
        return loader.bucket_groups(
            loader.build_catalog(cfg), decoder, rank=rank, world_size=2, gather=exchange.for_rank(rank)
        )

    _ranks(2, plan)
    first = exchange.sent[0]
    assert first["samples"] == 10 and first["groups"].dtype == np.int8
    assert first["groups"].tolist() == [1, 2, 0, -1, 1]
    assert first["at"].tolist() == [3] and first["reasons"] == ["corrupt"] and first["reason"].tolist() == [0]
    assert first["details"] == [f"cannot identify image file {str(tmp_path / 'bad.png')!r}"]
    second = exchange.sent[1]
    assert second["at"].tolist() == [5, 6] and second["reasons"] == ["no-caption", "tiny"]
    assert second["reason"].tolist() == [1, 0]


def test_a_rank_whose_share_fails_fails_every_rank_rather_than_hang(tmp_path):
    cfg = _folder(tmp_path, sizes=False)
    decoder = SampleDecoder.from_config(cfg, 0)

    def plan(rank, gather):
        catalog = loader.build_catalog(cfg)
        if rank == 1:
            catalog.record = lambda i: (_ for _ in ()).throw(OSError("disk gone"))
        return loader.bucket_groups(catalog, decoder, rank=rank, world_size=3, gather=gather)

    errors = _ranks(3, plan)
    assert isinstance(errors[1], OSError) and str(errors[1]) == "disk gone"
    for r in (0, 2):
        assert isinstance(errors[r], loader.PlanFailedElsewhere)  # the train loop words it in one line
        assert str(errors[r]) == "bucket planning failed on rank(s) [1]: their log says why"


def test_a_failing_share_keeps_its_own_error_when_the_exchange_fails_too(tmp_path):
    cfg = _folder(tmp_path, sizes=False)
    catalog = loader.build_catalog(cfg)
    catalog.record = lambda i: (_ for _ in ()).throw(OSError("disk gone"))

    def gone(obj):
        raise RuntimeError("peer gone")

    with pytest.raises(OSError, match="disk gone"):
        loader.bucket_groups(catalog, SampleDecoder.from_config(cfg, 0), rank=1, world_size=2, gather=gone)


@pytest.mark.parametrize(("top", "dtype"), [(127, np.int8), (128, np.int32), (40000, np.int32)])
def test_a_share_holds_every_bucket_number_it_sends(top, dtype):
    # 129 buckets: bucket 128 sent as int8 wrapped to -128, read as unusable, and left out of the plan.
    groups = np.array([top, -1, 0, top - 1])
    sent = loader._packed_share(4, groups, [])["groups"]
    assert sent.dtype == dtype and sent.astype(np.int64).tolist() == groups.tolist()


def test_the_train_loop_hands_the_loader_the_runs_all_gather(tmp_path, monkeypatch):
    from conftest import tiny_config
    from fusedit.train import distributed, loop

    handed, calls = [], []
    real = loop.step_loader

    def spy(*args, **kwargs):
        handed.append(kwargs["gather"])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "step_loader", spy)
    loop.train(tiny_config(train={"steps": 1}), tmp_path / "run")
    monkeypatch.setattr(distributed, "gather_object", lambda obj, env: calls.append((obj, env.rank)) or [obj])
    assert handed and handed[0]("share") == ["share"] and calls == [("share", 0)]


def test_ranks_that_see_different_data_are_refused(tmp_path):
    cfg = _folder(tmp_path, sizes=True)
    decoder = SampleDecoder.from_config(cfg, 0)
    shorter = tmp_path / "short.jsonl"
    shorter.write_text("".join((tmp_path / "index.jsonl").read_text().splitlines(keepends=True)[:7]))

    def plan(rank, gather):
        data = cfg if rank == 0 else DataConfig(**{**cfg.__dict__, "index_file": str(shorter)})
        return loader.bucket_groups(
            loader.build_catalog(data), decoder, rank=rank, world_size=2, gather=gather
        )

    for error in _ranks(2, plan):
        assert isinstance(error, ConfigError)
        assert str(error) == (
            "the processes see different data: their catalogs hold [10, 7] samples (rank order); every rank "
            "must read the same data (was it being written to?)"
        )


def test_a_gather_of_the_wrong_number_of_ranks_is_refused(tmp_path):
    cfg = _folder(tmp_path, sizes=True)
    with pytest.raises(ValueError, match=r"^gather returned 1 shares of the bucket plan, not world_size=2$"):
        loader.bucket_groups(
            loader.build_catalog(cfg),
            SampleDecoder.from_config(cfg, 0),
            rank=0,
            world_size=2,
            gather=lambda o: [o],
        )


def _batches(cfg: DataConfig, rank: int, world: int, gather) -> tuple[list, dict]:
    steps = loader.step_loader(cfg, 0, 2, 0, 3, rank=rank, world_size=world, gather=gather)
    ids = [batch["id"] for batch in steps]
    return ids, steps.state_dict()


def test_step_loaders_with_a_split_plan_read_the_batches_of_an_unsplit_one(tmp_path):
    cfg = _folder(tmp_path, sizes=False)
    alone = [_batches(cfg, rank, 2, None) for rank in (0, 1)]
    assert _ranks(2, lambda rank, gather: _batches(cfg, rank, 2, gather)) == alone
    # The planning skips in rank 0's state alone, as without the exchange.
    assert [state["skips"]["ids"] for _, state in alone] == [
        {"corrupt": ["bad.png"], "no-caption": ["e.png"], "tiny": ["tiny.png"]},
        {},
    ]


def _read(cfg: DataConfig, world: int, start: int, end: int, states: list) -> list:
    """Each of ``world`` ranks' loader over steps [start, end) (a global batch of 2), read through, planning
    split over the ranks; ``states``: each rank's state to resume from."""

    def work(rank, gather):
        steps = loader.step_loader(
            cfg, 0, 2 // world, start, end, rank=rank, world_size=world, state=states[rank], gather=gather
        )
        list(steps)
        return steps

    return _ranks(world, work)


def test_the_planning_skips_add_up_over_the_ranks_states_through_a_resume_and_a_resplit(tmp_path):
    """Rank 0 alone holds the planning skips, so the ranks' states sum to the one-process run's, through a
    resume and a resplit (every rank held a copy the exchange gave it: 2 of each over 2 ranks)."""
    from fusedit.data.skips import merged_skip_report

    cfg = _folder(tmp_path, sizes=False)
    (alone,) = _read(cfg, 1, 0, 4, [None])
    times = {"corrupt": 1, "no-caption": 1, "tiny": 1}  # the only skips: none is met reading
    assert alone.state_dict()["skips"]["times"] == times

    def summed(loaders) -> dict:
        total: dict = {}
        for each in loaders:
            for reason, n in each.state_dict()["skips"]["times"].items():
                total[reason] = total.get(reason, 0) + n
        return total

    first = _read(cfg, 2, 0, 2, [None, None])
    resumed = _read(cfg, 2, 2, 4, [json.loads(json.dumps(each.state_dict())) for each in first])
    for ranks in (first, resumed):
        assert [each.state_dict()["skips"]["times"] for each in ranks] == [times, {}]
        assert merged_skip_report([each.skipped_tally() for each in ranks]) == (
            "skipped 3 samples (3 times) over the 2 processes (3 found while planning the data, counted once): "
            f"corrupt 1 (e.g. bad.png: cannot identify image file {str(tmp_path / 'bad.png')!r}), no-caption 1 "
            "(e.g. e.png: its caption field is empty), tiny 1 (e.g. tiny.png: 6x6 < min_image_size 16)"
        )
    # Resumed on one process, and from one process on two: the run's skips, once.
    (down,) = _read(cfg, 1, 2, 4, [loader.resplit_state([each.state_dict() for each in first], 2)])
    assert down.state_dict()["skips"]["times"] == times
    (half,) = _read(cfg, 1, 0, 2, [None])
    up = _read(cfg, 2, 2, 4, [loader.resplit_state([half.state_dict()], 2)] * 2)
    assert summed(up) == times


def _spawned(rank: int, world: int, store: str, cfg: DataConfig, out: str) -> None:
    from fusedit.train.distributed import DistEnv, gather_object

    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        env = DistEnv(rank=rank, world_size=world, distributed=True)
        decoder = SampleDecoder.from_config(cfg, 0)
        groups, events = loader.bucket_groups(
            loader.build_catalog(cfg),
            decoder,
            rank=rank,
            world_size=world,
            gather=lambda obj: gather_object(obj, env),
        )
        Path(out, f"{rank}.json").write_text(json.dumps([groups.tolist(), events]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: about 15 s on 2 busy cores
@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed/gloo",
)
def test_two_gloo_processes_plan_what_one_does(tmp_path):
    cfg = _folder(tmp_path, sizes=False)
    groups, events = loader.bucket_groups(loader.build_catalog(cfg), SampleDecoder.from_config(cfg, 0))
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(
        _spawned, args=(2, str(tmp_path / "store"), cfg, str(out)), nprocs=2, start_method="spawn"
    )
    expected = json.loads(json.dumps([groups.tolist(), events]))
    assert [json.loads((out / f"{r}.json").read_text()) for r in (0, 1)] == [expected, expected]


def test_a_rank_whose_catalog_fails_fails_every_rank_rather_than_hang(tmp_path):
    # It failed before the exchange: the others waited in it (here until the barrier's timeout; under
    # torchrun until torchrun stopped them).
    cfg = _folder(tmp_path, sizes=True)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('[{"path": "a.png"},\n')
    data = [cfg, DataConfig(**{**cfg.__dict__, "index_file": str(broken)}), cfg]
    errors = _ranks(
        3,
        lambda rank, gather: loader.step_loader(
            data[rank], 0, 1, 0, 1, rank=rank, world_size=3, gather=gather
        ),
    )
    assert isinstance(errors[1], ConfigError) and str(errors[1]).startswith(
        f"data.index_file={str(broken)!r} holds"
    )
    for r in (0, 2):
        assert isinstance(errors[r], loader.PlanFailedElsewhere)
        assert str(errors[r]) == "bucket planning failed on rank(s) [1]: their log says why"


@pytest.mark.parametrize("buckets", [True, False], ids=["buckets", "no-buckets"])
@pytest.mark.parametrize("world", [2, 1])
def test_a_rank_whose_catalog_fails_enters_the_exchange_only_where_the_others_wait_in_it(
    tmp_path, buckets, world
):
    # With buckets the others wait in bucket planning's exchange: it sends its failure (None) once, then
    # raises its own error. Without, the others go on to their first training collective: this rank entering
    # an all-gather there would be a mismatched collective (a hang, or undefined behaviour). Alone: no exchange.
    cfg = _folder(tmp_path, sizes=True)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('[{"path": "a.png"},\n')
    bad = DataConfig(**{**cfg.__dict__, "index_file": str(broken), **({} if buckets else {"buckets": []})})
    sent: list = []
    with pytest.raises(ConfigError, match="^" + re.escape(f"data.index_file={str(broken)!r} holds")):
        loader.step_loader(
            bad, 0, 1, 0, 1, rank=world - 1, world_size=world, gather=lambda o: sent.append(o) or [o] * world
        )
    assert sent == ([None] if buckets and world > 1 else [])
