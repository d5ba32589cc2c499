"""GPU-only paths: CUDA-graph sampling and compiled (inductor) sampling. CI has no GPU, so these are
skipped there; benchmarks/gpu_session.sh runs them on a GPU machine (results in benchmarks/RESULTS.md)."""

import pytest
import torch

from conftest import randomize, tiny_config
from fusedit.sampling.generation import generate, sample_settings, to_sampling_form
from fusedit.system import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["a red circle", "two blue squares above a green triangle"]


def _model(**sections):
    cfg = tiny_config(**sections)
    torch.manual_seed(0)
    model = build_model(cfg, "cuda")
    randomize(model.denoiser)
    return to_sampling_form(model.eval(), cfg), cfg


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_cuda_graph_sampling_replays_the_same_kernels(precision, sampler):
    """A replayed step runs exactly the kernels of an eager one: the images are bit-identical."""
    model, cfg = _model(sample={"compile": "", "precision": precision})  # fp32: fp32 weights
    settings = sample_settings(cfg, sampler=sampler, steps=6)
    eager = generate(model, PROMPTS, **{**settings, "cuda_graphs": False})
    graphed = generate(model, PROMPTS, **{**settings, "cuda_graphs": True})
    assert torch.equal(eager, graphed)


def test_inductor_sampling_matches_eager_within_bf16_rounding():
    images = []
    for backend in ("", "inductor"):
        model, cfg = _model(sample={"compile": backend}, text={"trim_multiple": 16})
        images.append(generate(model, PROMPTS, **sample_settings(cfg, precision="bf16")))
    torch.testing.assert_close(images[1], images[0], atol=0.05, rtol=0)


def test_cuda_graphs_over_inductor_blocks_match_inductor_alone():
    model, cfg = _model(sample={"compile": "inductor"})
    settings = sample_settings(cfg, precision="bf16")
    plain = generate(model, PROMPTS, **{**settings, "cuda_graphs": False})
    graphed = generate(model, PROMPTS, **{**settings, "cuda_graphs": True})
    torch.testing.assert_close(graphed, plain, atol=1e-3, rtol=0)


def test_host_tensors_reach_the_gpu_without_the_host_waiting():
    """fusedit.devices.host_to_device, which a training step's latents, noise, times and token ids take: a
    copy from pageable memory would wait for the kernels queued before it (the last step's AdamW)."""
    from fusedit.devices import host_to_device

    x = torch.randn(16, 4, 64, 64)
    # A first copy fills the pinned host and the device caches: a fresh cudaHostAlloc or cudaMalloc may
    # itself wait for the device, which is not what this checks.
    host_to_device(x, "cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(int(5e8))  # a few hundred ms of queued work the copy must not wait for
    moved = host_to_device(x, "cuda")
    assert not torch.cuda.current_stream().query()  # the host is back before the sleep ended
    assert torch.equal(moved.cpu(), x)


def test_an_offloaded_ema_matches_one_on_the_gpu():
    """train.ema_offload: the weights' copies into pinned host memory are waited for before the host
    thread's lerp (they are queued behind a sleeping kernel: a lerp that did not wait would read buffers not
    yet written), and ``settle`` makes the next in-place change of the weights (the next pass's mul_, as the
    optimizer's step in training) wait for them on the GPU."""
    from fusedit.train.ema import EMA

    denoiser = build_model(tiny_config(), "cuda").denoiser
    beside, held = EMA(denoiser, 0.9), EMA(denoiser, 0.9, offload=True)
    beside.update(denoiser)
    held.update(denoiser)  # makes the EMA's copy stream
    (copies,) = held._streams.values()
    for _ in range(3):
        held.settle()
        with torch.no_grad():
            for p in denoiser.parameters():
                p.mul_(1.1)
        beside.update(denoiser)
        with torch.cuda.stream(copies):
            torch.cuda._sleep(int(5e8))  # the copies queue behind it: without settle the next mul_ runs first
        held.update(denoiser)
    for k, v in beside.state_dict().items():
        assert held.state_dict()[k].device.type == "cpu", k
        # The same lerp on two devices: equal up to how each compiles a * b + c (fused or not).
        torch.testing.assert_close(held.state_dict()[k], v.cpu(), rtol=1e-6, atol=1e-7)
