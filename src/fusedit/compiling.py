"""torch.compile plumbing shared by the parts that compile (the DiT blocks, the LLM and its K/V read):
the ``torch.compile`` arguments for a compile setting (train.compile, sample.compile), the inductor
options they carry, and undoing a compile. Compiler settings, not architecture, so the models package and
``fusedit.system`` import them from here."""

from __future__ import annotations

from torch import nn


def inductor_options() -> dict[str, bool]:
    """Inductor settings for compiled parts (the DiT blocks and, since the LLM may train and so run the
    same kind of backward, the LLM too), passed per compile rather than set process-wide.
    Mix-order reduction (fusing a norm's per-row and per-column reductions in backward) is off: in torch
    2.11 its scheduler fails an assertion ("AssertionError: 2048 v.s. 8192") compiling the backward of a
    fusedit-gemma2b block at batch 4 on an H200 (benchmarks/RESULTS.md), so a training run would crash at
    its first step for some batch sizes. Where torch has no such setting there is nothing to turn off."""
    import torch._inductor.config as inductor

    return {"triton.mix_order_reduction": False} if hasattr(inductor.triton, "mix_order_reduction") else {}


def compile_settings(name: str) -> dict:
    """``torch.compile`` arguments for a compile setting (train.compile, sample.compile) other than off.
    "max-autotune" is inductor that times several matmul and attention-epilogue kernel choices per shape
    at compile time and keeps the fastest (minutes more compiling; the options of torch's
    "max-autotune-no-cudagraphs" mode: CUDA graphs stay sample.cuda_graphs' choice). torch.compile takes a
    mode or options, not both, hence the options."""
    if name == "max-autotune":
        from torch._inductor import list_mode_options

        tuned = {**list_mode_options("max-autotune-no-cudagraphs"), **inductor_options()}
        return {"backend": "inductor", "options": tuned}
    return {"backend": name, "options": inductor_options() if name == "inductor" else None}


def uncompile(module: nn.Module) -> None:
    """Undo ``module.compile(...)``: nn.Module.compile keeps its compiled call in the private
    ``_compiled_call_impl`` and, in every torch this project supports (>= 2.5; still so in 2.13), has no
    public way back; None, that attribute's class default, makes ``__call__`` run the eager forward again."""
    module._compiled_call_impl = None
