"""The LLM side: loading, tokenising, and turning prompts into a TextContext the denoiser reads."""

from fusedit.text.context import TextContext, TextRequest
from fusedit.text.spec import LLMSpec

__all__ = ["LLMSpec", "TextContext", "TextRequest"]
