"""`fusedit serve`: the JSON API over urllib, `fusedit serve` itself, and the page in a real headless
browser (Debian's chromium driven by playwright, as a new user would use it; skipped, saying how to install
them, where either is missing). Every server runs a tiny random model built here."""

import dataclasses
import io
import json
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import randomize, tiny_config
from fusedit.cli import main
from fusedit.config import ConfigError
from fusedit.imaging import to_uint8
from fusedit.sampling import serve
from fusedit.sampling.generation import generate
from fusedit.sampling.serve import MAX_BODY_BYTES, DemoServer
from fusedit.system import build_model
from fusedit.train.checkpoint import save_checkpoint

INSTALL = (
    "the browser test needs playwright and Debian's chromium: pip install playwright && "
    "apt-get install chromium (playwright's own browser download is not needed)"
)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg)
    randomize(model.denoiser)
    return model.eval(), cfg


@pytest.fixture
def server(tiny):
    s = DemoServer(*tiny, host="127.0.0.1", port=0, source="tiny-test").start()
    yield s
    s.close()


# Straight to 127.0.0.1: an http_proxy in the environment (without no_proxy) would otherwise carry every call.
urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open


def call(server, path, body=None, raw: bytes | None = None):
    """(status, decoded JSON) of a GET, or of a POST when a body is given."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(server.url + path.lstrip("/"), data=data, headers=headers)
    try:
        with urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def fetch(server, path) -> bytes:
    with urlopen(server.url + path.lstrip("/"), timeout=30) as response:
        assert response.headers["Content-Type"] == "image/png"
        return response.read()


def wait(server, job_id, until=("done", "error"), timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, job = call(server, f"/api/jobs/{job_id}")
        assert status == 200
        if job["status"] in until:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout} s"
        time.sleep(0.02)


def reference(tiny, prompt, seed, steps, guidance=3.0, negative="", size=16, **settings) -> np.ndarray:
    """What `fusedit sample --prompt PROMPT --seed SEED` makes with these settings."""
    model, cfg = tiny
    x = generate(
        model,
        [prompt],
        image_size=size,
        steps=steps,
        guidance=guidance,
        negative_prompt=negative,
        seed=seed,
        **{"shift": cfg.sample.shift, **settings},
    )
    return to_uint8(x)[0]


class Gate:
    """A forward pre-hook on the denoiser that holds the worker before denoiser call ``at`` (0-based; one
    call per Euler step) until ``release()``: a deterministic way to look at a generation in progress."""

    def __init__(self, model, at: int):
        self.at, self.calls, self.open = at, 0, threading.Event()
        self.handle = model.denoiser.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1
        if self.calls == self.at + 1:
            assert self.open.wait(120), "the test never released the gate"

    def release(self):
        self.open.set()
        self.handle.remove()


# ---------------------------------------------------------------------------------------------------------
# The JSON API


def test_info_gives_the_model_defaults_and_limits(server):
    status, info = call(server, "/api/info")
    assert status == 200 and info["model"] == str(Path("tiny-test").resolve()) and info["design"] == "fusedit"
    assert info["use_ema"] is True
    assert info["defaults"] == {
        "negative_prompt": "",
        "steps": 3,
        "guidance": 3.0,
        "size": 16,
        "width": 16,
        "height": 16,
        "num_images": 1,
        "sampler": "euler",
        "shift": 1.0,
        "schedule": "uniform",
    }
    # Sides up to twice the trained 16 px by default: one click must not occupy the machine for hours.
    assert info["limits"]["size"] == [2, 32] and info["limits"]["size_multiple_of"] == 2
    assert info["limits"]["sampler"] == ["euler", "heun"] and info["limits"]["schedule"] == [
        "uniform",
        "diffusers",
    ]


def test_max_size_is_the_servers_choice_within_the_model_limits(tiny):
    model, cfg = tiny
    queue = serve.JobQueue(model, cfg, max_size=512)
    assert (
        queue.info()["limits"]["size"] == [2, 512] and queue.parse({"prompt": "x", "size": 512}).width == 512
    )
    queue.close()
    # Below the trained 16 px (a large model on a small card): the default side comes down with it.
    queue = serve.JobQueue(model, cfg, max_size=8)
    assert queue.info()["defaults"]["size"] == 8 and queue.parse({"prompt": "x"}).height == 8
    queue.close()
    with pytest.raises(
        ConfigError, match=r"--max-size 15 is not allowed \(allowed: a positive multiple of 2, the VAE's"
    ):
        serve.JobQueue(model, cfg, max_size=15)
    with pytest.raises(
        ConfigError,
        match=r"--max-size 32 is not allowed \(allowed: a positive multiple of 2, .*, up to 16 \(the APE",
    ):
        serve.JobQueue(model, tiny_config(model={"ape_max_size": 8}), max_size=32)
    with pytest.raises(ConfigError, match=r"--max-size 0 is not allowed \(allowed: a positive multiple of 2"):
        serve.JobQueue(model, cfg, max_size=0)


def test_sizes_stop_where_a_fixed_ape_table_ends(tiny):
    """A model with model.ape_max_size covers grids up to that many patches: larger sizes are refused up
    front (as an API error), not failed inside the job."""
    model, _ = tiny
    queue = serve.JobQueue(model, tiny_config(model={"ape_max_size": 8}))
    assert queue.max_size == 16  # 8 patches of 2 px


def test_generate_makes_the_images_fusedit_sample_makes(server, tiny):
    body = {
        "prompt": "a red circle",
        "negative_prompt": "a blue square",
        "steps": 2,
        "guidance": 2.5,
        "seed": 11,
        "width": 8,
        "height": 8,
        "num_images": 2,
    }
    status, job = call(server, "/api/generate", body)
    assert status == 202 and job["status"] in ("queued", "running", "done") and job["total"] == 2
    job = wait(server, job["id"])
    assert job["status"] == "done" and job["step"] == 2 and job["error"] is None and job["seconds"] > 0
    assert {k: job[k] for k in body} == body and (job["sampler"], job["shift"]) == ("euler", 1.0)
    assert [image["seed"] for image in job["images"]] == [11, 12]
    pngs = [fetch(server, image["url"]) for image in job["images"]]
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs)
    arrays = [np.asarray(Image.open(io.BytesIO(png))) for png in pngs]
    assert [a.shape for a in arrays] == [(8, 8, 3)] * 2
    # Each image is its own seed's, alone in its batch, up to float rounding: a batch of two may take other CPU
    # kernels (so other summation orders) than a batch of one, which moves a pixel by at most one level.
    settings = dict(steps=2, guidance=2.5, negative="a blue square", size=8)
    for array, seed in zip(arrays, (11, 12)):
        alone = reference(tiny, "a red circle", seed, **settings).astype(int)
        assert np.abs(array.astype(int) - alone).max() <= 1
    assert call(server, "/api/jobs")[1]["jobs"][0]["id"] == job["id"]


def test_width_and_height_make_a_wide_image(server, tiny):
    """The "size" field sets both sides and "width"/"height" one each: a 12 px wide, 8 px tall image, the one
    generate makes at (height, width) = (8, 12) from the same seed."""
    body = {"prompt": "a red circle", "steps": 2, "seed": 5, "size": 8, "width": 12}
    job = wait(server, call(server, "/api/generate", body)[1]["id"])
    assert job["status"] == "done" and (job["width"], job["height"]) == (12, 8)
    array = np.asarray(Image.open(io.BytesIO(fetch(server, job["images"][0]["url"]))))
    assert array.shape == (8, 12, 3)
    assert np.array_equal(array, reference(tiny, "a red circle", 5, steps=2, size=(8, 12)))
    # "size" as WIDTHxHEIGHT: the same image.
    job = wait(server, call(server, "/api/generate", {**body, "size": "12x8", "width": None})[1]["id"])
    assert (job["width"], job["height"]) == (12, 8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(fetch(server, job["images"][0]["url"])))), array)


def test_sampler_shift_and_schedule_reach_the_sampler(server, tiny):
    chosen = {"sampler": "heun", "shift": 2.5, "schedule": "diffusers"}
    body = {"prompt": "a red circle", "steps": 2, "seed": 4, **chosen}
    job = wait(server, call(server, "/api/generate", body)[1]["id"])
    assert job["status"] == "done" and {k: job[k] for k in chosen} == chosen
    array = np.asarray(Image.open(io.BytesIO(fetch(server, job["images"][0]["url"]))))
    assert np.array_equal(array, reference(tiny, "a red circle", 4, steps=2, **chosen))
    assert not np.array_equal(array, reference(tiny, "a red circle", 4, steps=2))


def test_a_queued_or_running_job_can_be_cancelled(server, tiny, monkeypatch):
    gate = Gate(tiny[0], at=1)  # hold the first job after its first step
    try:
        first = call(server, "/api/generate", {"prompt": "a red circle", "steps": 3})[1]
        while wait(server, first["id"], until=("running",))["step"] < 1:
            pass
        second = call(server, "/api/generate", {"prompt": "a blue square", "steps": 3})[1]
        status, answer = call(server, f"/api/jobs/{second['id']}/cancel", body={})
        assert status == 200 and answer["status"] == "cancelled"  # queued: never starts
        status, answer = call(server, f"/api/jobs/{first['id']}/cancel", body={})
        assert status == 200 and answer["status"] == "running"  # stops after the step it is in
    finally:
        gate.release()
    stopped = wait(server, first["id"], until=("cancelled",))
    assert (stopped["step"], stopped["images"], stopped["error"]) == (1, [], None)
    assert wait(server, second["id"], until=("cancelled",))["step"] == 0
    assert call(server, f"/api/jobs/{first['id']}/cancel", body={}) == (
        409,
        {"error": f"job {first['id']} is cancelled already (allowed: cancel a queued or running job)"},
    )
    assert call(server, "/api/jobs/99/cancel", body={})[0] == 404
    assert call(server, f"/api/jobs/{first['id']}/cancel")[0] == 405  # GET
    # The worker goes on with the next job. Past its last step (decoding) a job finishes: said so.
    decoding, go = threading.Event(), threading.Event()

    def slow_decode(x):
        decoding.set()
        assert go.wait(60), "the test never let the decode finish"
        return to_uint8(x)

    monkeypatch.setattr(serve, "to_uint8", slow_decode)
    last = call(server, "/api/generate", {"prompt": "x", "steps": 1})[1]
    try:
        assert decoding.wait(30)
        assert call(server, f"/api/jobs/{last['id']}/cancel", body={}) == (
            409,
            {"error": f"job {last['id']} is finishing: its last step is done"},
        )
    finally:
        go.set()
    assert wait(server, last["id"])["status"] == "done"


def test_a_prompt_cut_to_the_length_limit_is_told_on_every_job(server):
    """The log warns about each job's cut prompt; each job whose prompt was cut says so itself too."""
    long = "a red circle above a blue square " * 4  # 28 words, text.max_length = 16
    jobs = [
        wait(server, call(server, "/api/generate", {"prompt": p, "steps": 1})[1]["id"]) for p in (long, long)
    ]
    notice = "the prompt is longer than text.max_length=16 tokens: its end was cut"
    assert [job["notice"] for job in jobs] == [notice, notice]
    short = wait(server, call(server, "/api/generate", {"prompt": "a red circle", "steps": 1})[1]["id"])
    assert short["status"] == "done" and short["notice"] is None
    # A negative prompt at guidance 1 (the page sends its field with every request) is said to be unused.
    unused = {"prompt": "a red circle", "steps": 1, "guidance": 1, "negative_prompt": "blue"}
    job = wait(server, call(server, "/api/generate", unused)[1]["id"])
    assert job["notice"] == "guidance 1 samples the prompt alone: the negative prompt is not used"


def image_of(server, job) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(fetch(server, job["images"][0]["url"]))))


def test_an_empty_prompt_samples_unconditionally_as_fusedit_sample_does(server, tiny):
    """serve refused an empty prompt that `fusedit sample --prompt ""` samples (helper-115 R4): both take it
    as the unconditional input now, and the job says so."""
    for body in (
        {"prompt": "", "steps": 2, "seed": 5},
        {"prompt": "   ", "steps": 2, "seed": 5},
        {"seed": 5, "steps": 2},
    ):
        status, job = call(server, "/api/generate", body)
        assert status == 202
        job = wait(server, job["id"])
        assert job["status"] == "done" and job["prompt"] == ""
        assert job["notice"] == "the prompt is empty: sampled unconditionally"
        assert np.array_equal(image_of(server, job), reference(tiny, "", 5, steps=2))


def test_what_the_images_do_not_show_is_told_on_the_job(server, tiny):
    """Guidance 0 (the prompt unused), a cut negative prompt (said as such, not as a cut "prompt") and words
    the built-in tokenizer reads as <unk> (helper-115 M1, M4, B2)."""
    long = "a red circle above a blue square " * 4  # 28 words, text.max_length = 16

    def notice(**body):
        job = wait(server, call(server, "/api/generate", {"steps": 1, **body})[1]["id"])
        assert job["status"] == "done"
        return job["notice"]

    assert notice(prompt="a red circle", guidance=0) == (
        "guidance 0 samples the negative prompt alone: the prompt is not used"
    )
    cut = "longer than text.max_length=16 tokens"
    assert (
        notice(prompt="a red circle", negative_prompt=long)
        == f"the negative prompt is {cut}: its end was cut"
    )
    assert notice(prompt=long, negative_prompt=long, num_images=2) == (
        f"the prompt and the negative prompt are {cut}: their ends were cut"
    )
    # At guidance 1 the negative prompt is not encoded: only that it is unused is said.
    assert notice(prompt="a red circle", negative_prompt=long, guidance=1) == (
        "guidance 1 samples the prompt alone: the negative prompt is not used"
    )
    unknown = notice(prompt="An astronaut riding a Red horse.", negative_prompt="blurry")
    assert unknown.startswith(
        "the built-in word tokenizer reads 'astronaut', 'riding', 'horse' of the prompt and 'blurry' of the "
        "negative prompt as <unk>: it knows only the words of the shapes world's captions and the templates "
        "(a, above, an, and, below, blue, circle,"
    )
    # Case and punctuation alone say nothing, and make the image of the plain words.
    status, job = call(server, "/api/generate", {"prompt": "A Red Circle.", "steps": 2, "seed": 3})
    job = wait(server, job["id"])
    assert job["notice"] is None
    assert np.array_equal(image_of(server, job), reference(tiny, "a red circle", 3, steps=2))


def test_the_weights_are_named_in_the_info_and_on_every_job(tiny):
    """EMA or raw weights (helper-115 M3) and the model's folder, absolute (R7)."""
    model, cfg = tiny
    raw = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, use_ema=False))
    s = DemoServer(model, raw, host="127.0.0.1", port=0, source="runs/x/checkpoints/step_9").start()
    try:
        info = call(s, "/api/info")[1]
        assert info["use_ema"] is False and info["model"] == str(Path("runs/x/checkpoints/step_9").resolve())
        job = wait(s, call(s, "/api/generate", {"prompt": "a red circle", "steps": 1})[1]["id"])
        assert job["use_ema"] is False
    finally:
        s.close()


def test_each_finished_job_is_one_line_on_the_terminal(server, caplog):
    """serve logged nothing per job, so its terminal gave no sign of the page's work (helper-115 R8)."""
    with caplog.at_level("INFO", logger="fusedit.sampling.serve"):
        job = wait(
            server, call(server, "/api/generate", {"prompt": "a red circle", "num_images": 2})[1]["id"]
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "fusedit.sampling.serve"]
    assert lines == [
        f"job {job['id']} done in {job['seconds']:.1f} s: 2 images of 'a red circle', 16x16 px, under "
        f"/images/{job['id']}/"
    ]


def test_no_seed_draws_one_and_reports_it(server):
    ids = [call(server, "/api/generate", {"prompt": "a red circle", "seed": ""})[1]["id"] for _ in range(2)]
    jobs = [wait(server, i) for i in ids]
    seeds = [job["seed"] for job in jobs]
    assert all(0 <= s <= serve.SEED_MAX for s in seeds) and seeds[0] != seeds[1]
    assert [job["images"][0]["seed"] for job in jobs] == seeds


def test_every_images_seed_is_one_a_request_may_ask_for(tiny, monkeypatch):
    """Image i takes seed + i: a seed whose last image would pass SEED_MAX is refused (that image could not
    be asked for again, here or from `fusedit sample`), and a drawn seed leaves room for every image."""
    queue = serve.JobQueue(*tiny)
    try:
        top = serve.SEED_MAX - 7
        assert queue.parse({"prompt": "x", "seed": top, "num_images": 8}).seed == top
        refused = rf"seed={top + 1} is out of range \(allowed: 0..{top} for 8 images"
        with pytest.raises(serve.RequestError, match=refused) as e:
            queue.parse({"prompt": "x", "seed": top + 1, "num_images": "8"})
        assert e.value.status == 400
        monkeypatch.setattr(serve.secrets, "randbelow", lambda n: n - 1)  # the largest seed it can draw
        assert queue.parse({"prompt": "x", "num_images": 8}).seed == top
        assert queue.parse({"prompt": "x"}).seed == serve.SEED_MAX
    finally:
        queue.close()


def test_jobs_still_waiting_at_close_are_cancelled_saying_why(tiny):
    """close() lets the running generation finish; a job still queued never starts, and says so, so that
    a client following it is answered rather than left polling a job queued for ever."""
    queue = serve.JobQueue(*tiny)
    gate = Gate(tiny[0], at=0)  # hold the first job before its first step
    try:
        running = queue.submit({"prompt": "a red circle", "steps": 1})["id"]
        deadline = time.monotonic() + 30
        while queue.job(running)["status"] != "running":
            assert time.monotonic() < deadline, "the first job never started"
            time.sleep(0.005)
        waiting = queue.submit({"prompt": "a blue square", "steps": 1})["id"]
        queue.close(wait=False)
        job = queue.job(waiting)
        assert (job["status"], job["error"]) == ("cancelled", "the server shut down before this job started")
        with pytest.raises(serve.RequestError, match="the server is shutting down") as e:
            queue.submit({"prompt": "a green triangle", "steps": 1})
        assert e.value.status == 503
    finally:
        gate.release()
    queue._worker.join(30)
    assert not queue._worker.is_alive()
    assert [queue.job(i)["status"] for i in (running, waiting)] == ["done", "cancelled"]


def test_close_can_cancel_the_running_generation_and_waits_for_the_worker(tiny):
    """What Ctrl+C on `fusedit serve` does: the running job stops after its current step and the worker has
    left torch when close returns (an interpreter exiting with it inside torch aborted the process)."""
    queue = serve.JobQueue(*tiny)
    gate = Gate(tiny[0], at=1)  # hold the job before its second step
    running = queue.submit({"prompt": "a red circle", "steps": 3})["id"]
    deadline = time.monotonic() + 30
    while gate.calls < 2:
        assert time.monotonic() < deadline, "the job never reached its second step"
        time.sleep(0.005)
    closing = threading.Thread(target=queue.close, kwargs={"wait": True, "cancel_running": True})
    closing.start()
    time.sleep(0.05)
    assert closing.is_alive()  # waiting for the worker, which the gate holds inside the step
    gate.release()
    closing.join(30)
    assert not closing.is_alive() and not queue._worker.is_alive()
    job = queue.job(running)
    assert (job["status"], job["step"]) == ("cancelled", 1)


def test_a_bare_cancel_is_taken_from_a_tool_but_not_from_another_site(server, tiny):
    """`curl -X POST .../cancel` (no body, no Content-Type) got 415 (h-sample R5). A browser adds its Origin
    to any cross-site POST, which it may send without a preflight when it has no Content-Type: refused."""
    gate = Gate(tiny[0], at=1)  # hold the job after its first step
    try:
        job = call(server, "/api/generate", {"prompt": "a red circle", "steps": 3})[1]
        url = server.url + f"api/jobs/{job['id']}/cancel"
        cross_site = urllib.request.Request(url, method="POST", headers={"Origin": "https://evil.example"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urlopen(cross_site, timeout=30)
        assert (e.value.code, json.loads(e.value.read())) == (
            415,
            {"error": "Content-Type 'none' is not allowed (allowed: application/json)"},
        )
        with urlopen(urllib.request.Request(url, method="POST"), timeout=30) as response:
            assert response.status == 200 and json.loads(response.read())["id"] == job["id"]
    finally:
        gate.release()
    assert wait(server, job["id"], until=("cancelled",))["images"] == []
    # A body without a Content-Type is not bare: still refused.
    sent = urllib.request.Request(server.url + "api/jobs/99/cancel", data=b"{}", headers={"Content-Type": ""})
    with pytest.raises(urllib.error.HTTPError) as e:
        urlopen(sent, timeout=30)
    assert e.value.code == 415


def test_what_stopping_loses_is_the_finished_images_held_in_memory(server):
    """The gallery is not written anywhere: the stop line counts the finished images that go with the
    process, and says how to keep one (the page's image links download it)."""
    assert server.jobs.lost_on_exit() == "no finished image is lost"
    for images in (1, 2):
        job = call(server, "/api/generate", {"prompt": "a red circle", "steps": 1, "num_images": images})[1]
        wait(server, job["id"])
    assert server.jobs.lost_on_exit() == (
        "the 3 finished images of its jobs lived in memory only and are gone (to keep one, click it on the "
        "page before stopping: that downloads it)"
    )


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": 3}, "prompt=3 is not a string"),
        ({"prompt": "x", "steps": 0}, "steps=0 is out of range (allowed: 1..200)"),
        ({"prompt": "x", "steps": 201}, "steps=201 is out of range (allowed: 1..200)"),
        ({"prompt": "x", "steps": "many"}, "steps='many' is not an integer (allowed: 1..200)"),
        ({"prompt": "x", "steps": 2.5}, "steps=2.5 is not an integer"),
        # the value as the client sent it: JSON's true, not Python's True (h-sample R5)
        ({"prompt": "x", "steps": True}, "steps=true is not an integer (allowed: 1..200)"),
        ({"prompt": "x", "guidance": False}, "guidance=false is not a number"),
        ({"prompt": "x", "sampler": [1, None]}, "sampler=[1, null] is not allowed (allowed: euler, heun)"),
        ({"prompt": "x", "negative_prompt": {"a": True}}, 'negative_prompt={"a": true} is not a string'),
        ({"prompt": "x", "seed": "abc"}, "seed='abc' is not an integer (allowed: 0..4294967295)"),
        ({"prompt": "x", "seed": "1.5"}, "seed='1.5' is not an integer"),
        ({"prompt": "x", "seed": -1}, "seed=-1 is out of range"),
        (
            {"prompt": "x", "seed": 2**32 - 1, "num_images": 2},
            "seed=4294967295 is out of range (allowed: 0..4294967294 for 2 images: image i takes seed + i)",
        ),
        ({"prompt": "x", "size": 15}, "size=15 is not allowed (allowed: multiples of 2 from 2 to 32"),
        ({"prompt": "x", "size": 0}, "size=0 is out of range (allowed: 2..32)"),
        ({"prompt": "x", "size": "48x32"}, "size width=48 is out of range (allowed: 2..32)"),
        ({"prompt": "x", "size": "8 x 7"}, "size height=7 is not allowed (allowed: multiples of 2"),
        (
            {"prompt": "x", "size": "8x8x8"},
            "size='8x8x8' is not allowed (allowed: one side in pixels, or WIDTHx",
        ),
        (
            {"prompt": "x", "size": "8*8"},
            "size='8*8' is not allowed (allowed: one side in pixels, or WIDTHxHEIGHT such as 16x16)",
        ),
        ({"prompt": "x", "sampler": "ddim"}, "sampler='ddim' is not allowed (allowed: euler, heun)"),
        ({"prompt": "x", "schedule": 3}, "schedule=3 is not allowed (allowed: uniform, diffusers)"),
        ({"prompt": "x", "shift": 0}, "shift=0 is not allowed (allowed: a number from 0.01 to 20)"),
        ({"prompt": "x", "size": 8, "width": 7}, "width=7 is not allowed (allowed: multiples of 2 from 2"),
        ({"prompt": "x", "height": 4096}, "height=4096 is out of range (allowed: 2..32)"),
        ({"prompt": "x", "num_images": 0}, "num_images=0 is out of range (allowed: 1..8)"),
        ({"prompt": "x", "num_images": 9}, "num_images=9 is out of range (allowed: 1..8)"),
        (
            {"prompt": "x", "guidance": "strong"},
            "guidance='strong' is not a number (allowed: a number from 0 to 50)",
        ),
        (
            {"prompt": "x", "guidance": "nan"},
            "guidance='nan' is not allowed (allowed: a number from 0 to 50)",
        ),
        ({"prompt": "x", "guidance": 51}, "guidance=51 is not allowed"),
        ({"prompt": "x", "negative_prompt": 5}, "negative_prompt=5 is not a string"),
        ({"prompt": "x" * 4001}, "prompt has 4001 characters (allowed: at most 4000)"),
        # JSON escapes can spell a lone surrogate, which the tokenizer would only refuse in the worker
        ({"prompt": "a \ud800 b"}, "prompt has a lone surrogate '\\ud800' at character 2"),
        ({"prompt": "x", "negative_prompt": "\udfff"}, "negative_prompt has a lone surrogate"),
        ({"prompt": "x", "widht": 8}, "unknown field 'widht' (allowed: prompt, negative_prompt, steps,"),
        (["a red circle"], "the request body must be a JSON object with a prompt"),
    ],
)
def test_bad_input_is_a_one_line_json_error(server, body, message):
    status, answer = call(server, "/api/generate", body)
    assert status == 400 and message in answer["error"] and "\n" not in answer["error"]
    assert call(server, "/api/jobs")[1]["jobs"] == []  # nothing was queued


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"prompt": "a", "steps": ' + b"9" * 5000 + b"}", "the request body is not JSON"),
        (b'{"prompt": "a", "guidance": ' + b"1" + b"0" * 400 + b"}", "guidance="),
        (b'{"prompt": "a", "seed": "' + b"9" * 5000 + b'"}', "seed="),
    ],
)
def test_huge_numbers_are_one_line_errors_not_dropped_connections(server, raw, message):
    status, body = call(server, "/api/generate", raw=raw)
    assert status == 400 and message in body["error"] and "\n" not in body["error"]


def test_other_sites_cannot_queue_work_or_read_the_gallery(server):
    """A script on another page can send a text/plain POST without a CORS preflight, and a page that
    points its own name at 127.0.0.1 (DNS rebinding) sends its own Host header: both are refused."""
    url = server.url + "api/generate"
    data = json.dumps({"prompt": "a red circle"}).encode()
    plain = urllib.request.Request(url, data=data, headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urlopen(plain, timeout=30)
    assert e.value.code == 415 and "allowed: application/json" in json.loads(e.value.read())["error"]
    rebound = urllib.request.Request(server.url + "api/jobs", headers={"Host": "evil.example:7860"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urlopen(rebound, timeout=30)
    assert (
        e.value.code == 403
        and "'evil.example:7860' is not this machine" in json.loads(e.value.read())["error"]
    )
    assert call(server, "/api/jobs")[1] == {"jobs": []}  # nothing was queued
    local = urllib.request.Request(
        server.url + "api/jobs", headers={"Host": f"localhost:{server.server_address[1]}"}
    )
    with urlopen(local, timeout=30) as response:
        assert response.status == 200


def test_malformed_requests_and_unknown_paths(server):
    status, answer = call(server, "/api/generate", raw=b"prompt=a red circle")
    assert status == 400 and answer["error"].startswith("the request body is not JSON")
    assert call(server, "/api/jobs/99") == (
        404,
        {"error": "no job 99 (it never existed or was dropped from the gallery)"},
    )
    assert call(server, "/images/99/0.png")[0] == 404
    assert call(server, "/nowhere") == (404, {"error": "no such path: /nowhere"})
    assert call(server, "/api/jobs", body={})[0] == 404  # POST only to /api/generate and .../cancel
    assert call(server, "/api/generate") == (
        405,
        {"error": "GET /api/generate is not allowed (allowed: POST)"},
    )
    # A cancel's body is not used, but its length is checked as the generate's is: it is read.
    host = f"Host: 127.0.0.1:{server.server_address[1]}\r\nContent-Type: application/json\r\n"
    for length, code, error in (
        (MAX_BODY_BYTES + 1, "413", f"the request body has {MAX_BODY_BYTES + 1} bytes"),
        ("ten", "411", "the request needs a Content-Length header"),
    ):
        request = f"POST /api/jobs/1/cancel HTTP/1.1\r\n{host}Content-Length: {length}\r\n\r\n"
        status, _, body = raw_exchange(server, request.encode())
        assert status.split()[1] == code and body["error"].startswith(error)


def raw_exchange(server, request: bytes) -> tuple[str, dict, dict]:
    """(status line, headers, JSON body) of a hand-written request that urllib would not send; an answer
    without a body (HEAD) gives {}."""
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, headers, json.loads(body) if body else {}


def test_http_servers_own_refusals_are_json_too(server):
    """Methods the API lacks and broken request lines get the API's JSON errors, with a status line,
    not http.server's HTML page (or, for a broken line, a bare body)."""
    host = f"Host: 127.0.0.1:{server.server_address[1]}\r\n"
    for method in ("PUT", "DELETE", "OPTIONS", "BREW"):
        status, headers, body = raw_exchange(
            server, f"{method} /api/generate HTTP/1.1\r\n{host}\r\n".encode()
        )
        assert status.endswith("405 Method Not Allowed") and headers["Allow"] == "GET, HEAD, POST"
        assert headers["Content-Type"] == "application/json"
        assert body == {"error": f"method '{method}' is not allowed (allowed: GET, HEAD, POST)"}
    status, headers, body = raw_exchange(server, b"GARBAGE\r\n\r\n")
    assert status.endswith("400 Bad Request") and body == {"error": "Bad request syntax ('GARBAGE')"}
    status, _, body = raw_exchange(server, b"GET / HTTP/9.9\r\n\r\n")
    assert status.endswith("505 HTTP Version Not Supported") and body == {
        "error": "Invalid HTTP version (9.9)"
    }
    assert call(server, "/api/jobs")[1] == {"jobs": []}  # nothing was queued


def request(server, line: str, body: bytes | None = None, host: str | None = None) -> bytes:
    host = host or f"127.0.0.1:{server.server_address[1]}"
    head = f"{line} HTTP/1.1\r\nHost: {host}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


@pytest.mark.parametrize(
    "line, body",
    [
        ("GET /api/jobs/" + "9" * 5000, None),
        ("HEAD /api/jobs/" + "9" * 5000, None),
        ("GET /images/1/" + "9" * 5000 + ".png", None),
        ("GET /images/" + "9" * 5000 + "/0.png", None),
        ("POST /api/jobs/" + "9" * 5000 + "/cancel", b"{}"),
    ],
)
def test_a_job_id_too_long_for_int_is_a_404(server, line, body):
    """int() refuses strings of more than 4300 digits: such an id crashed the handler (no answer at all)."""
    status, _, answer = raw_exchange(server, request(server, line, body))
    assert status.split()[1:2] == ["404"]
    if not line.startswith("HEAD"):
        assert "\n" not in answer["error"]


def test_a_silent_connection_is_closed_after_the_timeout(tiny, monkeypatch):
    """A client that declares a body and never sends it (or opens a connection and says nothing) must not
    hold a handler thread for ever."""
    assert serve._Handler.timeout == serve.REQUEST_TIMEOUT_S  # socketserver's default is None: no timeout
    monkeypatch.setattr(serve._Handler, "timeout", 0.5)
    s = DemoServer(*tiny, host="127.0.0.1", port=0).start()
    try:
        # Content-Length says 100 bytes; 1 comes.
        short = request(s, "POST /api/generate", b"{").replace(
            b"Content-Length: 1\r\n", b"Content-Length: 100\r\n"
        )
        with socket.create_connection(s.server_address[:2], timeout=30) as sock:
            sock.sendall(short)
            assert sock.recv(65536) == b""  # the server closed it (a client timeout would raise instead)
        assert call(s, "/api/jobs")[1] == {"jobs": []}
    finally:
        s.close()


@pytest.mark.parametrize("error, traceback", [(ConnectionResetError, False), (RuntimeError, True)])
def test_a_client_gone_mid_request_prints_no_traceback(tiny, monkeypatch, capfd, error, traceback):
    """A closed tab resets its connection (routine: no traceback on the server's stderr); a bug in a
    handler still prints one."""

    def fail(handler):
        raise error("from the handler")

    monkeypatch.setattr(serve._Handler, "do_GET", fail)
    s = DemoServer(*tiny, host="127.0.0.1", port=0).start()
    try:
        with socket.create_connection(s.server_address[:2], timeout=30) as sock:
            sock.sendall(request(s, "GET /api/jobs"))
            assert sock.recv(65536) == b""
    finally:
        s.close()
    assert ("Traceback" in capfd.readouterr().err) == traceback


@pytest.mark.parametrize("opening", [b"[", b'{"a":'])
def test_deeply_nested_json_is_a_400(server, opening):
    """json's decoder recurses per level and raises RecursionError, not ValueError: a body of nested
    brackets within the size limit crashed the handler."""
    body = opening * (MAX_BODY_BYTES // len(opening))
    status, _, answer = raw_exchange(server, request(server, "POST /api/generate", body))
    assert status.split()[1:2] == ["400"]
    assert answer == {
        "error": "the request body nests JSON arrays or objects too deeply (allowed: a flat object)"
    }
    assert server.jobs.jobs() == []


@pytest.mark.parametrize(
    "bind, host, code",
    [
        (
            "127.0.0.1",
            "LocalHost:{port}",
            "200",
        ),  # host names are case-insensitive (curl sends them as typed)
        ("127.0.0.1", "LOCALHOST", "200"),
        ("::1", "[::1]", "200"),  # no port: the address must not lose its end as one
        ("::1", "[::1]:{port}", "200"),
        ("127.0.0.1", "localhost.evil.example:{port}", "403"),
        ("127.0.0.1", "127.0.0.1:{port}, evil.example", "403"),
        ("::1", "[::1]evil.example", "403"),
    ],
)
def test_the_host_header_names_this_machine_in_any_valid_spelling(tiny, bind, host, code):
    if ":" in bind:
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind((bind, 0))
        except OSError:
            pytest.skip("this machine has no IPv6 loopback")
    s = DemoServer(*tiny, host=bind, port=0).start()
    try:
        status, _, answer = raw_exchange(
            s, request(s, "GET /api/jobs", host=host.format(port=s.server_address[1]))
        )
        assert status.split()[1:2] == [code]
        assert answer == {"jobs": []} if code == "200" else "is not this machine" in answer["error"]
    finally:
        s.close()


def test_the_models_own_defaults_are_always_allowed(tiny):
    """The page fills its form with the model's sampling defaults and sends them as they are: a model whose
    defaults lie outside the server's usual limits (many steps, strong guidance, a small shift) must not
    have its own settings refused, as the image side and a large shift already were not."""
    model, _ = tiny
    cfg = tiny_config(sample={"steps": 250, "guidance": 60.0, "shift": 0.005})
    queue = serve.JobQueue(model, cfg)
    try:
        info = queue.info()
        limits = info["limits"]
        assert (limits["steps"], limits["guidance"], limits["shift"]) == (
            [1, 250],
            [0.0, 60.0],
            [0.005, 20.0],
        )
        # What the page sends: every field, as the text of its inputs.
        sent = {k: str(v) for k, v in info["defaults"].items() if k != "size"}
        r = queue.parse({**sent, "prompt": "a red circle", "seed": "1"})
        assert (r.steps, r.guidance, r.shift) == (250, 60.0, 0.005)
        # Past the widened limits is still refused.
        with pytest.raises(serve.RequestError, match=r"steps=251 is out of range \(allowed: 1..250\)"):
            queue.parse({"prompt": "x", "steps": 251})
        with pytest.raises(serve.RequestError, match=r"shift=0.001 is not allowed"):
            queue.parse({"prompt": "x", "shift": 0.001})
    finally:
        queue.close()
    # A model inside the usual limits keeps them.
    queue = serve.JobQueue(model, tiny_config())
    try:
        limits = queue.info()["limits"]
        assert (limits["steps"], limits["guidance"], limits["shift"]) == ([1, 200], [0.0, 50.0], [0.01, 20.0])
    finally:
        queue.close()


def test_jobs_run_in_the_order_they_were_accepted(tiny):
    """Requests are answered on threads: a job must enter the worker's queue as it gets its id, or a second
    request between the two overtakes the first (which its "ahead" count and the FIFO promise deny)."""
    queue = serve.JobQueue(*tiny)
    order, done = [], threading.Semaphore(0)

    def record(job):
        order.append(job.id)
        done.release()
        return []

    queue._generate = record
    put, second_answered = queue._waiting.put, threading.Event()

    def slow_put(job):
        if job is not None and job.id == 1:  # the first request's thread is paused here...
            second_answered.wait(1.0)  # ...until the second is answered, or for 1 s when that must wait
        put(job)

    queue._waiting.put = slow_put
    try:
        first = threading.Thread(target=queue.submit, args=({"prompt": "a red circle"},))
        first.start()
        while 1 not in queue._jobs:
            time.sleep(0.001)

        def second():
            queue.submit({"prompt": "a blue square"})
            second_answered.set()

        threading.Thread(target=second).start()
        first.join()
        assert done.acquire(timeout=30) and done.acquire(timeout=30)
        assert order == [1, 2]
    finally:
        queue.close()


def test_jobs_run_one_at_a_time_with_live_progress(server, tiny):
    model, _ = tiny
    active, most, lock = [0], [0], threading.Lock()

    def enter(*_):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.005)  # widen the window in which an overlapping call would be seen

    def leave(*_):
        with lock:
            active[0] -= 1

    hooks = [model.denoiser.register_forward_pre_hook(enter), model.denoiser.register_forward_hook(leave)]
    gate = Gate(model, at=1)  # hold the first job after its first step
    try:
        first = call(server, "/api/generate", {"prompt": "a red circle", "steps": 4, "seed": 1})[1]
        job = wait(server, first["id"], until=("running",))
        while job["step"] < 1:
            job = wait(server, first["id"], until=("running",))
        assert (job["step"], job["total"]) == (1, 4)
        # Requests from several clients at once queue up behind it.
        answers = []
        threads = [
            threading.Thread(
                target=lambda i=i: answers.append(
                    call(server, "/api/generate", {"prompt": "a blue square", "steps": 2, "seed": i})[1]
                )
            )
            for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        queued = sorted(answers, key=lambda j: j["id"])
        assert [j["status"] for j in queued] == ["queued"] * 3 and [j["ahead"] for j in queued] == [1, 2, 3]
        assert call(server, f"/api/jobs/{first['id']}")[1]["step"] == 1  # still held: nothing overtook it
        gate.release()
        done = [wait(server, j["id"]) for j in [first, *queued]]
    finally:
        gate.release()
        for h in hooks:
            h.remove()
    assert [j["status"] for j in done] == ["done"] * 4 and [j["step"] for j in done] == [4, 2, 2, 2]
    assert most[0] == 1
    assert [j["id"] for j in call(server, "/api/jobs")[1]["jobs"]] == sorted(
        (j["id"] for j in done), reverse=True
    )


def test_a_failed_generation_is_reported_and_the_server_carries_on(server, tiny):
    model, _ = tiny

    def fail(*_):
        raise RuntimeError("out of memory\nmore details")

    handle = model.denoiser.register_forward_pre_hook(fail)
    try:
        failed = wait(server, call(server, "/api/generate", {"prompt": "a red circle"})[1]["id"])
    finally:
        handle.remove()
    assert failed["status"] == "error" and failed["error"] == "generation failed: out of memory"
    assert failed["images"] == []
    assert (
        wait(server, call(server, "/api/generate", {"prompt": "a red circle"})[1]["id"])["status"] == "done"
    )


def test_a_full_queue_refuses_more(server, tiny, monkeypatch):
    monkeypatch.setattr(serve, "MAX_WAITING", 2)
    gate = Gate(tiny[0], at=0)
    try:
        ids = [call(server, "/api/generate", {"prompt": "x", "steps": 1})[1]["id"]]
        wait(server, ids[0], until=("running",))
        ids += [call(server, "/api/generate", {"prompt": "x", "steps": 1})[1]["id"] for _ in range(2)]
        status, answer = call(server, "/api/generate", {"prompt": "x", "steps": 1})
        assert status == 503 and answer["error"].startswith("2 jobs are already waiting (allowed: 2)")
    finally:
        gate.release()
    assert all(wait(server, i)["status"] == "done" for i in ids)


def test_the_page_is_self_contained(server):
    with urlopen(server.url, timeout=30) as response:
        html = response.read().decode()
        csp = response.headers["Content-Security-Policy"]
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert not re.search(r"""(src|href|action)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?https?:""", html)
    for element_id in (
        "prompt",
        "negative",
        "steps",
        "guidance",
        "seed",
        "width",
        "height",
        "count",
        "generate",
        "gallery",
    ):
        assert f'id="{element_id}"' in html


# ---------------------------------------------------------------------------------------------------------
# `fusedit serve`


def test_ctrl_c_says_what_stopping_the_server_loses(tmp_path, tiny, monkeypatch, capsys):
    model, cfg = tiny
    save_checkpoint(tmp_path / "run", 0, cfg, model.denoiser, None, None, model.text.llm)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DemoServer, "serve_forever", interrupted)
    assert main(["serve", str(tmp_path / "run"), "--port", "0", "--device", "cpu"]) == 0
    # Nothing runs: no "running generation" to speak of (h-sample R5).
    assert capsys.readouterr().err.endswith("stopping: no finished image is lost\n")

    gates, close = [], DemoServer.close

    def interrupted_mid_job(self, *args, **kwargs):
        gates.append(Gate(self.jobs.model, at=1))  # held in its second step until the server closes
        job = self.jobs.submit({"prompt": "a red circle", "steps": 3})["id"]
        while gates[0].calls < 1:
            time.sleep(0.005)
        assert self.jobs.job(job)["status"] == "running"
        raise KeyboardInterrupt

    def released_then_closed(self, *args, **kwargs):
        gates[0].release()
        close(self, *args, **kwargs)

    monkeypatch.setattr(DemoServer, "serve_forever", interrupted_mid_job)
    monkeypatch.setattr(DemoServer, "close", released_then_closed)
    assert main(["serve", str(tmp_path / "run"), "--port", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().err.endswith(
        "stopping: a running generation ends after its current step; no finished image is lost\n"
    )


def test_fusedit_serve_loads_a_run_folder_and_serves_it(tmp_path, tiny, monkeypatch, capsys):
    model, cfg = tiny
    save_checkpoint(tmp_path / "run", 0, cfg, model.denoiser, None, None, model.text.llm)
    started = []
    serve_forever = DemoServer.serve_forever

    def record(self, *args, **kwargs):
        started.append(self)
        serve_forever(self, *args, **kwargs)

    monkeypatch.setattr(DemoServer, "serve_forever", record)
    codes = []
    runner = threading.Thread(
        target=lambda: codes.append(main(["serve", str(tmp_path / "run"), "--port", "0", "--device", "cpu"]))
    )
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while not started:
            assert runner.is_alive() and time.monotonic() < deadline, "fusedit serve did not start"
            time.sleep(0.02)
        server = started[0]
        assert call(server, "/api/info")[1]["model"] == str(
            tmp_path / "run" / "checkpoints" / "step_00000000"
        )
        job = wait(server, call(server, "/api/generate", {"prompt": "a red circle", "steps": 1})[1]["id"])
        assert job["status"] == "done"
    finally:
        if started:
            started[0].shutdown()  # what Ctrl+C does to serve_forever
        runner.join(30)
    assert codes == [0] and f"at {server.url} (Ctrl+C stops)" in capsys.readouterr().out


def test_fusedit_serve_bad_arguments_fail_with_one_line(tmp_path, tiny, capsys, monkeypatch):
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "--port 70000 is not allowed (allowed: 0..65535" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nothing"), "--device", "cpu"]) == 2
    assert "no such folder" in capsys.readouterr().err
    with socket.socket() as taken:  # a port in use is reported before any model is loaded
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path / "nothing"), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    model, cfg = tiny
    save_checkpoint(tmp_path / "run", 0, cfg, model.denoiser, None, None, model.text.llm)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --max-size was checked")

    monkeypatch.setattr("fusedit.sampling.source.load_sampling_model", no_load)
    assert main(["serve", str(tmp_path / "run"), "--port", "0", "--device", "cpu", "--max-size", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--max-size 7 is not allowed (allowed: a positive multiple of 2, the VAE's downsampling" in err
    assert "\n" not in err


# ---------------------------------------------------------------------------------------------------------
# The page in a real browser


def wait_until(page, predicate: str, arg=None, timeout: float = 30.0) -> None:
    """Poll a JS predicate from Python. Playwright's own wait_for_function compiles its predicate with eval
    inside the page, which the page's Content-Security-Policy (no 'unsafe-eval') rightly refuses whenever
    the predicate is not already true at the first check."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(predicate, arg):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {predicate}"
        page.wait_for_timeout(25)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(f"playwright is not installed: {INSTALL}")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip(f"no chromium on PATH: {INSTALL}")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=executable, headless=True)
        except Exception as e:  # a browser that cannot start here is an environment problem, not fusedit's
            pytest.skip(f"chromium ({executable}) did not start under playwright: {str(e).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    p = context.new_page()
    p.set_default_timeout(30_000)
    p.requests = []
    p.on("request", lambda request: p.requests.append(request.url))
    p.goto(server.url)
    p.wait_for_selector("body[data-ready=true]")
    yield p
    context.close()


def test_a_user_generates_images_in_the_browser(page, server, tiny):
    # The form starts at the model's own defaults.
    assert [page.input_value(f"#{i}") for i in ("steps", "guidance", "width", "height", "count")] == [
        "3",
        "3",
        "16",
        "16",
        "1",
    ]
    assert f"tiny (fusedit) \u00b7 {Path('tiny-test').resolve()} \u00b7 EMA weights" in page.inner_text(
        "#model"
    )
    page.fill("#prompt", "a red circle above a blue square")
    page.fill("#negative", "a green triangle")
    page.fill("#steps", "2")
    page.fill("#seed", "21")
    page.fill("#count", "2")
    page.click("#generate")

    card = page.locator(".card[data-status=done]")
    card.wait_for()
    wait_until(
        page, "() => [...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth)"
    )
    assert card.locator("img").evaluate_all(
        "images => images.map(i => [i.naturalWidth, i.naturalHeight])"
    ) == [
        [16, 16],
        [16, 16],
    ]
    assert card.locator(".prompt").inner_text() == "a red circle above a blue square"
    meta = card.locator(".meta").inner_text()
    for part in ("negative: a green triangle", "2 steps", "guidance 3", "16x16 px", "seeds 21-22", "euler"):
        assert part in meta, meta
    assert card.locator("figcaption").all_inner_texts() == ["seed 21", "seed 22"]
    assert page.inner_text("#progress-text").startswith("done in")
    assert not page.is_visible("#error")

    # The picture shown is the real PNG, the one `fusedit sample --seed 21` makes (up to the rounding of a
    # batch of two against one, as in the API test).
    png = fetch(server, card.locator("img").first.get_attribute("src"))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    expected = reference(tiny, "a red circle above a blue square", 21, steps=2, negative="a green triangle")
    assert np.abs(np.asarray(Image.open(io.BytesIO(png))).astype(int) - expected.astype(int)).max() <= 1

    # The gallery is kept by the server: a reload shows it again; "use these settings" refills the form.
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.locator(".card[data-status=done]").wait_for()
    page.click(".card .reuse")
    assert (
        page.input_value("#seed") == "21"
        and page.input_value("#prompt") == "a red circle above a blue square"
    )
    assert all(url.startswith(server.url) for url in page.requests), page.requests  # nothing from elsewhere


def test_the_page_shows_live_progress_and_puts_the_newest_first(page, server, tiny):
    gate = Gate(tiny[0], at=1)  # the first job stops after step 1 of 3
    try:
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "3")
        page.click("#generate")
        wait_until(page, "() => document.querySelector('#progress-text').textContent === 'step 1 of 3'")
        assert page.locator(".card .status-text").inner_text() == "step 1 of 3"
        assert page.get_attribute("#bar", "value") == "1"
        page.fill("#prompt", "two blue squares")
        page.click("#generate")  # queued behind the held one
        wait_until(page, "() => document.querySelector('#progress-text').textContent === 'waiting: 1 ahead'")
    finally:
        gate.release()
    wait_until(page, "() => document.querySelectorAll('.card[data-status=done]').length === 2")
    assert page.locator(".card .prompt").all_inner_texts() == ["two blue squares", "a red circle"]
    assert not page.locator(".card .cancel").first.is_visible()  # nothing left to cancel


def test_the_page_cancels_a_job_and_sends_the_sampler_settings(page, server, tiny):
    assert page.input_value("#sampler") == "euler" and page.input_value("#schedule") == "uniform"
    gate = Gate(tiny[0], at=2)  # heun: two denoiser calls per step
    try:
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "3")
        page.select_option("#sampler", "heun")
        page.fill("#shift", "2")
        page.click("#generate")
        wait_until(page, "() => document.querySelector('#progress-text').textContent === 'step 1 of 3'")
        # The click only starts the page's POST: the gate opens once the server has answered it (the job is
        # marked), or the worker could finish step 2 before the cancel lands.
        with page.expect_response(lambda r: r.url.endswith("/cancel")) as answer:
            page.click(".card .cancel")
        assert answer.value.status == 200
    finally:
        gate.release()
    page.locator(".card[data-status=cancelled]").wait_for()
    assert page.locator(".card .status-text").inner_text() == "cancelled after step 1 of 3"
    assert "heun \u00b7 shift 2 \u00b7 uniform times" in page.locator(".card .meta").inner_text()
    assert not page.locator(".card .cancel").is_visible() and page.locator(".card img").count() == 0


def test_the_page_shows_what_is_wrong_with_the_input(page):
    cases = [
        ("a red circle", {"#seed": "abc"}, "seed='abc' is not an integer (allowed: 0..4294967295)"),
        ("a red circle", {"#seed": "", "#steps": "0"}, "steps=0 is out of range (allowed: 1..200)"),
        ("a red circle", {"#steps": "2", "#width": "15"}, "width=15 is not allowed"),
    ]
    for prompt, fields, message in cases:
        page.fill("#prompt", prompt)
        for selector, value in fields.items():
            page.fill(selector, value)
        page.click("#generate")
        wait_until(page, "m => document.querySelector('#error').textContent.includes(m)", message)
        assert page.is_visible("#error")
    assert page.locator(".card").count() == 0  # no bad request became a job
    # Fixing the input clears the error and generates.
    page.fill("#width", "16")
    page.click("#generate")
    page.locator(".card[data-status=done]").wait_for()
    assert not page.is_visible("#error")


def test_a_host_that_cannot_be_listened_on_names_the_host_not_the_port(tmp_path, capsys):
    """`--host nonexistent.invalid` was told to choose another --port."""
    assert main(["serve", str(tmp_path), "--host", "nonexistent.invalid", "--port", "8000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusedit: error: cannot listen on nonexistent.invalid:8000: ")
    assert err.endswith(" (allowed: --host an address of this machine, e.g. 127.0.0.1 or 0.0.0.0)\n")
    assert "--port" not in err
