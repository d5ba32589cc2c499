"""``fusedit serve``: a local web demo of a text-to-image model.

One page (``serve_page.html``: inline CSS and JavaScript, nothing loaded from anywhere else) with a prompt
box, the sampling settings, live progress and a gallery, over a small JSON API:

    GET  /                     the page
    GET  /api/info             the model (its folder, absolute; EMA or raw weights: "use_ema"), its
                               sampling defaults and the allowed ranges
    POST /api/generate         {"prompt", "negative_prompt", "steps", "guidance", "seed", "size",
                               "width", "height", "num_images", "sampler", "shift", "schedule"} (all
                               but the prompt optional, and an empty prompt samples unconditionally, as
                               `fusedit sample --prompt ""` does; "size" sets both sides, as one number
                               or "WIDTHxHEIGHT", "width"/"height" one) -> 202 the new job,
                               or 400 {"error": "<one line naming the bad value and what is allowed>"}
    POST /api/jobs/<id>/cancel a queued job never starts; a running one stops after its current step
                               (409 when finished, or finishing: past its last step)
    GET  /api/jobs             the kept jobs, newest first (the gallery)
    GET  /api/jobs/<id>        one job: status (queued, running, done, error, cancelled), step of total,
                               images, use_ema, a notice (what the images do not show: a prompt or
                               negative prompt cut to text.max_length, a prompt or negative prompt the
                               guidance leaves unused, words the built-in tokenizer reads as <unk>, an
                               empty prompt) or null
    GET  /images/<id>/<n>.png  image n of a job

Both POSTs need ``Content-Type: application/json`` (the cancel's body is ignored): a page of another site
cannot send that without a CORS preflight, which this server never grants. A cancel with no body, no
Content-Type and no Origin header (``curl -X POST``; a browser always sends its Origin) is taken too.

Requests are answered on threads (``http.server.ThreadingHTTPServer``) but only one worker thread ever runs
the model: jobs wait in a queue, so generations never run concurrently (a model is not safe to call from
two threads, and two generations at once would not finish sooner). The worker samples through
``fusedit.sampling.generation.generate``, counting the sampler's steps with its progress callback; the page
polls the job for "step k of N". Each finished job is logged in one line on the server's terminal.

Image i of a job starts from the noise of seed + i alone, so each image is the one ``fusedit sample MODEL
--prompt ... --seed <its seed>`` makes with the same settings (up to float rounding between batch sizes);
a request whose seed + i would pass SEED_MAX is refused, as `fusedit sample` refuses it.
"""

from __future__ import annotations

import errno
import http
import http.server
import io
import ipaddress
import json
import logging
import math
import queue
import re
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from fusedit.config import (
    SEED_MAX,
    Config,
    ConfigError,
    SampleConfig,
    allowed_sides,
    choices_of,
    side_fits,
    side_limits,
)
from fusedit.imaging import to_uint8
from fusedit.sampling.generation import (
    check_seed,
    cut_note,
    generate,
    latent_shape,
    negative_read,
    sample_settings,
    seeded_noise,
    unknown_words_note,
    unused_prompt_note,
)
from fusedit.system import TextToImage

log = logging.getLogger(__name__)

# Limits on one request: a demo server must not let one click occupy the machine for hours or run it out of
# memory, and a mistyped value should come back as an error rather than as a very long wait. A model whose own
# sampling defaults lie outside them widens them (JobQueue): the page sends those defaults as they are.
MAX_STEPS = 200
MAX_IMAGES = 8
MAX_GUIDANCE = 50.0
# The sampling time shift a request may ask for: 1 = none, SD3 uses 3. Any positive value is well defined;
# far outside this range the steps bunch at one end.
SHIFT_RANGE = (0.01, 20.0)
MAX_PROMPT_CHARS = 4000
MAX_BODY_BYTES = 64 * 1024
# Jobs waiting at once; more are refused (503) instead of piling up behind a slow model.
MAX_WAITING = 16
# Jobs (with their PNGs) kept for the gallery; the oldest finished ones are dropped beyond this.
KEEP_JOBS = 64
ALLOWED_METHODS = "GET, HEAD, POST"
REQUEST_TIMEOUT_S = 60
# A job id or image index in a path. Bounded: int() refuses more than 4300 digits (a ValueError that would
# drop the connection), and longer numbers never name a job or image anyway, so such paths are 404s.
ID = r"\d{1,18}"
FIELDS = (
    "prompt",
    "negative_prompt",
    "steps",
    "guidance",
    "seed",
    "size",
    "width",
    "height",
    "num_images",
    "sampler",
    "shift",
    "schedule",
)


class RequestError(ValueError):
    """Bad input, answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    """One validated generation request."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    seed: int
    height: int
    width: int
    num_images: int
    sampler: str
    shift: float
    schedule: str


class Cancelled(Exception):
    """Raised from the sampler's progress callback to stop a job whose cancel was asked for."""


@dataclass
class Job:
    id: int
    request: Request
    status: str = "queued"  # queued -> running -> done | error | cancelled (queued -> cancelled too)
    step: int = 0
    cancel: bool = False
    images: list[bytes] = field(default_factory=list)
    error: str | None = None
    # What the images do not show (a prompt cut to text.max_length, ...: the module docstring lists them),
    # said on the job it concerns, which the page shows beside its images.
    notice: str | None = None
    seconds: float | None = None


def _blank(value) -> bool:
    """An absent field or an empty form input: the model's default applies."""
    return value is None or (isinstance(value, str) and not value.strip())


def _sent(value) -> str:
    """A field's value as the client sent it, for an error: JSON's spelling (`true`, `null`, `[1]`) for
    what is not a string; a string quoted as fusedit's other messages quote it. Python's repr said
    "steps=True" to a client that sent `true` (h-sample R5)."""
    return repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if _blank(value):
        return default
    number = value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d{1,18}", value.strip()):  # longer: never in range
        number = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    # bool is an int subclass, but `true` is not a step count.
    if not isinstance(number, int) or isinstance(number, bool):
        raise RequestError(f"{name}={_sent(value)} is not an integer (allowed: {low}..{high})")
    if not low <= number <= high:
        raise RequestError(f"{name}={number} is out of range (allowed: {low}..{high})")
    return number


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if _blank(value):
        return default
    allowed = f"allowed: a number from {low:g} to {high:g}"
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer beyond float's range
        raise RequestError(f"{name}={_sent(value)} is not a number ({allowed})") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise RequestError(f"{name}={_sent(value)} is not allowed ({allowed})")
    return number


def _choice(body: dict, name: str, default: str) -> str:
    value = body.get(name)
    if _blank(value):
        return default
    allowed = choices_of(SampleConfig, name)  # now: the model's plugins may have registered more
    if value not in allowed:
        raise RequestError(f"{name}={_sent(value)} is not allowed (allowed: {', '.join(allowed)})")
    return value


def _text(body: dict, name: str, default: str) -> str:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise RequestError(f"{name}={_sent(value)} is not a string")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(f"{name} has {len(value)} characters (allowed: at most {MAX_PROMPT_CHARS})")
    # JSON's \ud800-style escapes can spell lone surrogates, which no tokenizer takes: refused here rather
    # than accepted and then failed by the worker.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(
                f"{name} has a lone surrogate {value[e.start]!r} at character {e.start} (allowed: valid Unicode)"
            ) from None
    return value


def max_side(cfg: Config, wanted: int | None = None) -> tuple[int, int]:
    """(unit, largest) image side in pixels a server of ``cfg``'s model takes: a multiple of ``unit`` (whole
    patches of whole latent pixels, as FuseDiTPipeline checks) up to ``wanted`` (`fusedit serve
    --max-size`), by default twice the trained side (data.image_size); never past a fixed APE table."""
    unit, largest = side_limits(cfg)
    if wanted is None:
        side = 2 * cfg.data.image_size // unit * unit
        return unit, min(side, largest) if largest else side
    if not side_fits(wanted, cfg):
        raise ConfigError(f"--max-size {wanted} is not allowed (allowed: {allowed_sides(cfg)})")
    return unit, wanted


class JobQueue:
    """The model, the one worker thread that runs it, and the jobs (all methods are thread-safe)."""

    def __init__(self, model: TextToImage, cfg: Config, source: str = "", max_size: int | None = None):
        """``source``: the folder the model was read from ("" for none), recorded absolute so that it still
        names the folder once copied elsewhere. ``max_size``: the largest image side a request may ask for;
        None = twice the side the model was trained at (``data.image_size``), so that one click cannot
        occupy the machine for hours."""
        self.model, self.cfg = model, cfg
        self.source = str(Path(source).resolve()) if source else ""
        self.size_unit, self.max_size = max_side(cfg, max_size)
        # The page's default side is the trained one, unless the server caps sides below it.
        defaults = sample_settings(cfg)
        self.defaults = {**defaults, "image_size": min(defaults["image_size"], self.max_size)}
        self.max_steps = max(MAX_STEPS, defaults["steps"])
        self.max_guidance = max(MAX_GUIDANCE, defaults["guidance"])
        self.shift_range = (min(SHIFT_RANGE[0], defaults["shift"]), max(SHIFT_RANGE[1], defaults["shift"]))
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._next_id = 1
        self._waiting: queue.Queue[Job | None] = queue.Queue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="fusedit-serve-worker", daemon=True)
        self._worker.start()

    # ---- requests
    def info(self) -> dict:
        d = self.defaults
        return {
            "model": self.source,
            "use_ema": self.cfg.sample.use_ema,
            "name": self.cfg.name,
            "design": self.cfg.model.design,
            "defaults": {
                "negative_prompt": d["negative_prompt"],
                "steps": d["steps"],
                "guidance": d["guidance"],
                "size": d["image_size"],
                "width": d["image_size"],
                "height": d["image_size"],
                "num_images": 1,
                "sampler": d["sampler"],
                "shift": d["shift"],
                "schedule": d["schedule"],
            },
            "limits": {
                "steps": [1, self.max_steps],
                "guidance": [0.0, self.max_guidance],
                "seed": [0, SEED_MAX],
                "size": [self.size_unit, self.max_size],
                "size_multiple_of": self.size_unit,
                "shift": list(self.shift_range),
                "sampler": list(choices_of(SampleConfig, "sampler")),
                "schedule": list(choices_of(SampleConfig, "schedule")),
                "num_images": [1, MAX_IMAGES],
                "prompt_chars": MAX_PROMPT_CHARS,
            },
        }

    def parse(self, body) -> Request:
        """A request body (decoded JSON) -> a Request; RequestError naming the first bad value."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object with a prompt")
        unknown = [k for k in body if k not in FIELDS]
        if unknown:
            raise RequestError(f"unknown field {unknown[0]!r} (allowed: {', '.join(FIELDS)})")
        # An empty prompt is the model's unconditional input, as for `fusedit sample` (the job says so).
        prompt = _text(body, "prompt", "").strip()
        d = self.defaults
        height, width = self._sides(body)
        num_images = _integer(body, "num_images", 1, 1, MAX_IMAGES)
        # No seed: a fresh random one, reported with the images so that they can be made again. Image i
        # takes seed + i, which must stay within SEED_MAX for it to be asked for again.
        seed = secrets.randbelow(SEED_MAX + 2 - num_images)
        if not _blank(body.get("seed")):
            seed = _integer(body, "seed", seed, 0, SEED_MAX)
            try:
                check_seed(seed, num_images)
            except ConfigError as e:
                raise RequestError(str(e)) from None
        return Request(
            prompt=prompt,
            negative_prompt=_text(body, "negative_prompt", d["negative_prompt"]),
            steps=_integer(body, "steps", d["steps"], 1, self.max_steps),
            guidance=_number(body, "guidance", d["guidance"], 0.0, self.max_guidance),
            seed=seed,
            height=height,
            width=width,
            num_images=num_images,
            sampler=_choice(body, "sampler", d["sampler"]),
            shift=_number(body, "shift", d["shift"], *self.shift_range),
            schedule=_choice(body, "schedule", d["schedule"]),
        )

    def _sides(self, body: dict) -> tuple[int, int]:
        """(height, width): "size" sets both (one number, or "WIDTHxHEIGHT"), "width"/"height" one."""
        default = self.defaults["image_size"]
        size = body.get("size")
        # A text that is not one whole number is read as WIDTHxHEIGHT, so a slip ("64*32") names that form.
        if isinstance(size, str) and not _blank(size) and not re.fullmatch(r"\s*[+-]?\d+\s*", size):
            m = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", size)
            if m is None:
                raise RequestError(
                    f"size={size!r} is not allowed (allowed: one side in pixels, or WIDTHxHEIGHT such as "
                    f"{default}x{default})"
                )
            width = self._side({"size width": m[1]}, "size width", default)
            height = self._side({"size height": m[2]}, "size height", default)
        else:
            height = width = self._side(body, "size", default)
        return self._side(body, "height", height), self._side(body, "width", width)

    def _side(self, body: dict, name: str, default: int) -> int:
        """An image side in pixels: whole patches of whole latent pixels, within the size limits."""
        side = _integer(body, name, default, self.size_unit, self.max_size)
        if side % self.size_unit:
            raise RequestError(
                f"{name}={side} is not allowed (allowed: multiples of {self.size_unit} from {self.size_unit} "
                f"to {self.max_size}: the VAE's downsampling x the patch size)"
            )
        return side

    def submit(self, body) -> dict:
        """Validate and queue a request; returns the new job's snapshot."""
        request = self.parse(body)
        with self._lock:
            if self._stop.is_set():
                raise RequestError("the server is shutting down", status=503)
            waiting = sum(job.status == "queued" for job in self._jobs.values())
            if waiting >= MAX_WAITING:
                raise RequestError(
                    f"{waiting} jobs are already waiting (allowed: {MAX_WAITING}); try again when one finishes",
                    status=503,
                )
            job = Job(self._next_id, request)
            self._next_id += 1
            self._jobs[job.id] = job
            # Queued under the lock: another request's job, numbered after this one, must not get in first.
            self._waiting.put(job)
            return self._snapshot(job)

    def job(self, job_id: int) -> dict | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else self._snapshot(job)

    def jobs(self) -> list[dict]:
        with self._lock:
            return [self._snapshot(job) for job in sorted(self._jobs.values(), key=lambda j: -j.id)]

    def image(self, job_id: int, index: int) -> bytes | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return job.images[index] if job is not None and 0 <= index < len(job.images) else None

    def running(self) -> bool:
        """Whether a generation is running now: the Ctrl+C line speaks of one only then."""
        with self._lock:
            return any(job.status == "running" for job in self._jobs.values())

    def lost_on_exit(self) -> str:
        """What stopping the server loses, for its Ctrl+C line: the finished images of its jobs, which live in
        this process's memory only (the gallery is not written anywhere)."""
        with self._lock:
            images = sum(len(job.images) for job in self._jobs.values())
        if not images:
            return "no finished image is lost"
        return (
            f"the {images} finished image{'s' if images > 1 else ''} of its jobs lived in memory only and "
            f"{'are' if images > 1 else 'is'} gone (to keep one, click it on the page before stopping: that "
            "downloads it)"
        )

    def _snapshot(self, job: Job) -> dict:
        """The JSON view of a job (called under the lock)."""
        r = job.request
        ahead = 0
        if job.status == "queued":
            ahead = sum(j.id < job.id and j.status in ("queued", "running") for j in self._jobs.values())
        return {
            "id": job.id,
            "status": job.status,
            "step": job.step,
            "total": r.steps,
            "ahead": ahead,
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "steps": r.steps,
            "guidance": r.guidance,
            "seed": r.seed,
            "width": r.width,
            "height": r.height,
            "num_images": r.num_images,
            "sampler": r.sampler,
            "shift": r.shift,
            "schedule": r.schedule,
            "use_ema": self.cfg.sample.use_ema,
            "images": [
                {"url": f"/images/{job.id}/{i}.png", "seed": r.seed + i} for i in range(len(job.images))
            ],
            "error": job.error,
            "notice": job.notice,
            "seconds": job.seconds,
        }

    def cancel(self, job_id: int) -> dict:
        """Cancel a queued job (it never starts) or a running one (it stops after its current step, with
        no images); returns its snapshot. RequestError for an unknown or finished job."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise RequestError(f"no job {job_id} (it never existed or was dropped from the gallery)", 404)
            if job.status not in ("queued", "running"):
                raise RequestError(
                    f"job {job_id} is {job.status} already (allowed: cancel a queued or running job)", 409
                )
            if job.step == job.request.steps:  # only the decode is left: it would finish regardless
                raise RequestError(f"job {job_id} is finishing: its last step is done", 409)
            job.cancel = True
            if job.status == "queued":
                job.status = "cancelled"
            return self._snapshot(job)

    # ---- the worker
    def _work(self) -> None:
        while True:
            job = self._waiting.get()
            if job is None or self._stop.is_set():
                return
            with self._lock:
                if job.status != "queued":  # cancelled while it waited
                    continue
                job.status = "running"
            start = time.perf_counter()
            images, error, status = [], None, "done"
            try:
                images = self._generate(job)
            except Cancelled:
                status = "cancelled"
            except Exception as e:  # whatever one generation hits, the server stays up and the page says why
                log.exception("generation %d failed", job.id)
                error = f"generation failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                status = "error"
            # One update, so that no reader ever sees a finished job without its images or its time.
            with self._lock:
                job.images, job.error, job.status = images, error, status
                job.seconds = round(time.perf_counter() - start, 3)
                self._prune()
            self._log_finished(job)

    @staticmethod
    def _log_finished(job: Job) -> None:
        """The terminal's sign of the page's work: one line per finished job (a failed one's traceback is
        logged as it fails)."""
        r = job.request
        if job.status == "done":
            count = f"{len(job.images)} image{'s' * (len(job.images) != 1)}"
            log.info(
                "job %d done in %.1f s: %s of %r, %dx%d px, under /images/%d/",
                job.id,
                job.seconds,
                count,
                r.prompt[:80],
                r.width,
                r.height,
                job.id,
            )
        elif job.status == "cancelled":
            log.info("job %d cancelled after step %d of %d (%.1f s)", job.id, job.step, r.steps, job.seconds)

    def _generate(self, job: Job) -> list[bytes]:
        r = job.request
        settings = sample_settings(
            self.cfg,
            steps=r.steps,
            guidance=r.guidance,
            image_size=(r.height, r.width),
            negative_prompt=r.negative_prompt,
            sampler=r.sampler,
            shift=r.shift,
            schedule=r.schedule,
        )
        shape = latent_shape(self.model, (r.height, r.width))
        noise = seeded_noise([r.seed + i for i in range(r.num_images)], shape)

        def advance() -> None:  # after each sampler step
            with self._lock:
                if job.cancel:
                    raise Cancelled
                job.step += 1

        x, cut = generate(
            self.model,
            [r.prompt] * r.num_images,
            seed=r.seed,
            noise=noise,
            progress=advance,
            return_cut=True,
            **settings,
        )
        notices = []
        if not r.prompt:
            notices.append("the prompt is empty: sampled unconditionally")
        unknown = unknown_words_note(self.model, self.cfg, [r.prompt], negative_read(settings))
        if unknown:
            notices.append(unknown)
        # The job's one prompt, sampled for each image: all its rows are cut, or none.
        cut_prompt = cut_note(len(cut.prompts), None, self.model.limits_of(cut.limits), cut.negative)
        if cut_prompt:
            notices.append(cut_prompt)
        # Not refused as `fusedit sample` refuses a negative prompt at guidance 1: the page sends its negative
        # prompt field with every request, and a user trying guidance 1 should not have to empty it first.
        unused = unused_prompt_note(settings["guidance"], bool(settings["negative_prompt"]))
        if unused:
            notices.append(unused)
        if notices:
            with self._lock:
                job.notice = "; ".join(notices)
        pngs = []
        for array in to_uint8(x):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        return pngs

    def _prune(self) -> None:
        """Drop the oldest finished jobs beyond KEEP_JOBS (called under the lock)."""
        finished = sorted(j.id for j in self._jobs.values() if j.status in ("done", "error", "cancelled"))
        for job_id in finished[: max(0, len(self._jobs) - KEEP_JOBS)]:
            del self._jobs[job_id]

    def close(self, wait: bool = True, cancel_running: bool = False) -> None:
        """Stop the worker after the generation it is running (``cancel_running``: after that generation's
        current step). Jobs still waiting never start: they are cancelled, saying why, so that a client
        following one is answered rather than left waiting. ``wait``: until the worker has stopped."""
        # Under the lock, as submit checks it: a job is either accepted before and cancelled here, or refused.
        with self._lock:
            self._stop.set()
            for job in self._jobs.values():
                if job.status == "queued":
                    job.status, job.error = "cancelled", "the server shut down before this job started"
                elif job.status == "running" and cancel_running:
                    job.cancel = True
        self._waiting.put(None)
        if wait:
            self._worker.join()


def page() -> bytes:
    return resources.files("fusedit.sampling").joinpath("serve_page.html").read_bytes()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "fusedit-serve"
    # Seconds a connection may sit without sending (a client that opens one and goes silent, or sends less
    # body than its Content-Length): the socket times out and the thread is freed. The page's requests are
    # small and answered at once (it polls; nothing streams), so no real request comes near it.
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args) -> None:
        # The page polls several times a second: per-request lines would bury the server's own messages.
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: int, message: str, extra: dict | None = None) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json", extra)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, headers too long, a method with no do_*
        handler) as the API's JSON errors instead of its HTML page. An unknown method is 405 with Allow."""
        self.close_connection = True  # the request may not have been read to its end
        # A request line too broken to name its version leaves http.server at HTTP/0.9, which answers with
        # a bare body: the status line and headers are what tell a client the request was refused.
        self.request_version = self.protocol_version
        if code == http.HTTPStatus.NOT_IMPLEMENTED:
            self._error(
                405,
                f"method {self.command!r} is not allowed (allowed: {ALLOWED_METHODS})",
                {"Allow": ALLOWED_METHODS},
            )
            return
        self._error(code, message or http.HTTPStatus(code).phrase)

    def do_GET(self) -> None:
        jobs = self.server.jobs
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            # The page may only talk to this server: no scripts, styles, fonts or images from elsewhere.
            csp = (
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'"
            )
            self._send(200, self.server.page, "text/html; charset=utf-8", {"Content-Security-Policy": csp})
        elif path == "/api/info":
            self._json(200, jobs.info())
        elif path == "/api/jobs":
            self._json(200, {"jobs": jobs.jobs()})
        elif m := re.fullmatch(rf"/api/jobs/({ID})", path):
            job = jobs.job(int(m[1]))
            if job is None:
                self._error(404, f"no job {m[1]} (it never existed or was dropped from the gallery)")
            else:
                self._json(200, job)
        elif m := re.fullmatch(rf"/images/({ID})/({ID})\.png", path):
            png = jobs.image(int(m[1]), int(m[2]))
            if png is None:
                self._error(404, f"no image {m[2]} of job {m[1]}")
            else:
                self._send(200, png, "image/png")
        elif path == "/api/generate" or re.fullmatch(rf"/api/jobs/{ID}/cancel", path):
            self._error(405, f"{self.command} {path} is not allowed (allowed: POST)", {"Allow": "POST"})
        elif path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._error(404, f"no such path: {path}")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _trusted_host(self) -> bool:
        """Bound to loopback, answer only requests addressed to loopback: a web page that points its own
        name at 127.0.0.1 (DNS rebinding) must not read the gallery or queue work."""
        if not ipaddress.ip_address(self.server.server_address[0]).is_loopback:
            return True
        # NAME[:PORT] or [IPV6]:PORT, the port optional: "[::1]" alone must not lose its end as a port.
        m = re.fullmatch(
            r"\[(?P<v6>[^\]]*)\](?::\d*)?|(?P<name>[^:]*)(?::\d*)?", self.headers.get("Host") or ""
        )
        host = "" if m is None else m["name"] if m["v6"] is None else m["v6"]
        if host.lower() == "localhost":  # host names are case-insensitive
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def parse_request(self) -> bool:  # every verb passes here once the request line and headers are read
        if not super().parse_request():
            return False
        if not self._trusted_host():
            self._error(403, f"Host {self.headers.get('Host')!r} is not this machine (allowed: localhost)")
            return False
        return True

    def _body(self, required: bool) -> bytes | None:
        """The request body, b"" where none is sent and ``required`` is False; None after an error reply."""
        given = self.headers.get("Content-Length")
        if given is None and not required:
            return b""
        try:
            length = int(given or "")
        except ValueError:
            self._error(411, "the request needs a Content-Length header")
            return None
        if length < 0:
            self._error(400, f"Content-Length {length} is not a byte count")
            return None
        if length > MAX_BODY_BYTES:
            self._error(413, f"the request body has {length} bytes (allowed: at most {MAX_BODY_BYTES})")
            return None
        return self.rfile.read(length)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        cancel = re.fullmatch(rf"/api/jobs/({ID})/cancel", path)
        if path != "/api/generate" and cancel is None:
            self._error(
                404, f"no such path: POST {path} (allowed: POST /api/generate, POST /api/jobs/<id>/cancel)"
            )
            return
        # application/json makes a cross-site request from another page's script need a CORS preflight,
        # which this server never grants: only this page (and local tools) can queue or cancel work.
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        # A bare cancel (no Content-Type, no body: `curl -X POST .../cancel`) is a local tool's. A page of
        # another site can send one without a preflight too, but a browser always adds its Origin: with
        # one, the cancel still needs application/json.
        bare = (
            cancel is not None
            and not content_type
            and self.headers.get("Origin") is None
            and self.headers.get("Content-Length", "0").strip() == "0"
        )
        if content_type != "application/json" and not bare:
            self._error(
                415, f"Content-Type {content_type or 'none'!r} is not allowed (allowed: application/json)"
            )
            return
        raw = self._body(required=cancel is None)
        if raw is None:
            return
        # The cancel names its job in the path: a body it is sent is read (the next request on the
        # connection starts after it) but not used.
        if cancel is not None:
            try:
                self._json(200, self.server.jobs.cancel(int(cancel[1])))
            except RequestError as e:
                self._error(e.status, str(e))
            return
        try:
            body = json.loads(raw.decode("utf-8"))
        except ValueError as e:  # bad UTF-8, bad JSON, or a number too long for Python to read
            self._error(400, f"the request body is not JSON ({e})")
            return
        except RecursionError:  # json's decoder recurses once per nested array or object
            self._error(
                400, "the request body nests JSON arrays or objects too deeply (allowed: a flat object)"
            )
            return
        try:
            job = self.server.jobs.submit(body)
        except RequestError as e:
            self._error(e.status, str(e))
            return
        self._json(202, job)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET  # ":": an IPv6 address such as ::1


def _listen_error(host: str, port: int, e: OSError) -> OSError:
    """Why ``host:port`` cannot be listened on, with the flag to change: the port for one in use or
    reserved, the host for a name that does not resolve or an address this machine does not have."""
    if e.errno in (errno.EADDRINUSE, errno.EACCES):
        hint = " (choose another --port, or 0 for any free one)"
    elif isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
        hint = " (allowed: --host an address of this machine, e.g. 127.0.0.1 or 0.0.0.0)"
    else:
        hint = ""
    return OSError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}")


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` and let it go, as DemoServer binds it (SO_REUSEADDR), so that a port in use is
    reported before a slow model load rather than after it."""
    with socket.socket(_family(host)) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise _listen_error(host, port, e) from None


class DemoServer(http.server.ThreadingHTTPServer):
    """The demo's HTTP server over one model. ``serve_forever()`` blocks; ``start()`` serves on a background
    thread instead (tests, notebooks); ``close()`` stops both the server and the worker."""

    daemon_threads = True

    def __init__(
        self,
        model: TextToImage,
        cfg: Config,
        host: str = "127.0.0.1",
        port: int = 7860,
        source: str = "",
        max_size: int | None = None,
    ):
        self.address_family = _family(host)
        self.page = page()
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise _listen_error(host, port, e) from None
        try:
            self.jobs = JobQueue(model, cfg, source, max_size)
        except BaseException:
            self.server_close()  # do not keep the port for a server that will never run
            raise
        self._thread: threading.Thread | None = None

    def handle_error(self, request, client_address) -> None:
        """A browser that closes a tab or reloads mid-request resets its connection: routine, so a debug
        line rather than socketserver's traceback on stderr; anything else keeps the traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):  # reset, aborted, broken pipe
            log.debug("%s closed the connection mid-request", client_address[0])
        else:
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):  # listening everywhere: this machine reaches it as localhost
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def start(self) -> DemoServer:
        # A short poll interval: close() waits up to one interval for the serving loop to notice.
        self._thread = threading.Thread(
            target=self.serve_forever, args=(0.05,), name="fusedit-serve-http", daemon=True
        )
        self._thread.start()
        return self

    def close(self, wait: bool = True, cancel_running: bool = False) -> None:
        """Stop serving and stop the worker (JobQueue.close: ``wait`` for it, ``cancel_running`` its job)."""
        if self._thread is not None:
            self.shutdown()  # returns once serve_forever has stopped, so it is only called when that runs
            self._thread.join()
            self._thread = None
        self.server_close()
        self.jobs.close(wait, cancel_running)
