"""Prompt templates: how a prompt is presented to the LLM, shared by training and sampling.

A template is a plain-text prefix and suffix around the prompt. They are tokenised apart from the prompt,
so the encoder knows exactly which tokens are the template's ("instruction tokens"): LI-DiT's refiners
read them and they are dropped afterwards (design-space.md s.2). Chat templates are rendered by the
tokenizer around a placeholder, and split there. The encoder moves a prefix's closing spaces onto the
prompt, so the pieces tokenise as the whole text does, and gives an empty prompt no template (the
unconditional input, as in the public code).

| name         | text                                                                                  |
|--------------|---------------------------------------------------------------------------------------|
| plain        | ``text.instruction`` + prompt (FuseDiT's plain-text prefix study, e.g. "Imagine: ")   |
| chat         | the tokenizer's chat template: [system prompt], user: instruction + prompt            |
| lidit        | system prompt, then LI-DiT's instruction + prompt, as plain text                      |
| lidit-chat   | LI-DiT's instruction + prompt as the user turn of the chat template                   |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fusedit.config import ConfigError, TemplateTraits, register_variant

# LI-DiT's "usage guidance" instruction (Ma et al. 2024, design-space.md s.2).
LIDIT_INSTRUCTION = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, and spatial "
    "relationships of the objects: "
)
_PLACEHOLDER = "<<fusedit-prompt>>"
# The date a chat template is rendered with. Llama-3.2/3.3-Instruct's templates write "Today Date: <today>"
# into the system turn unless given date_string: rendered afresh at every build, the text the refiners read
# (and so the images) would change from day to day. A fixed date keeps a run's conditioning what it trained
# on; templates that print no date ignore it. (The date those templates use when no clock is available.)
CHAT_DATE = "26 Jul 2024"


@dataclass(frozen=True)
class Template:
    prefix: str
    suffix: str
    # Whether the prefix text already holds the tokenizer's special tokens (rendered chat templates).
    rendered: bool = False


def _chat(tokenizer, user: str, system_prompt: str, key: str) -> Template:
    if not getattr(tokenizer, "chat_template", None):
        name = repr(tokenizer.name_or_path) if tokenizer.name_or_path else "(the built-in word tokenizer)"
        raise ConfigError(
            f"{key}.template needs a chat template but tokenizer {name} has none (allowed without one: plain, "
            "lidit)"
        )
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user + _PLACEHOLDER})
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, date_string=CHAT_DATE
        )
    except TemplateError as e:
        # Gemma's template refuses a system turn ("System role not supported"): a setting to change.
        given = f" with text.system_prompt={system_prompt!r}" if system_prompt else ""
        allowed = "an empty text.system_prompt, or " if system_prompt else ""
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r}'s chat template refuses the prompt{given}: {e} (allowed: "
            f"{allowed}text.template plain or lidit, which need no chat template)"
        ) from None
    prefix, _, suffix = text.partition(_PLACEHOLDER)
    return Template(prefix, suffix, rendered=True)


def build_template(
    name: str, tokenizer, instruction: str = "", system_prompt: str = "", key: str = "text"
) -> Template:
    """The template ``name`` (TEMPLATES) of an LLM's section ``key`` (text, extra_text.0: what errors name)."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown {key}.template {name!r} (allowed: {', '.join(TEMPLATES)})")
    return TEMPLATES[name](tokenizer, instruction, system_prompt, key)


def _lidit(tokenizer, instruction: str, system_prompt: str, key: str) -> Template:
    system = f"{system_prompt} " if system_prompt else ""
    return Template(system + LIDIT_INSTRUCTION + instruction, "")


# text.template -> (tokenizer, instruction, system_prompt, key) -> Template.
TEMPLATES = {
    "plain": lambda tokenizer, instruction, system_prompt, key: Template(instruction, ""),
    "chat": _chat,
    "lidit": _lidit,
    "lidit-chat": lambda tokenizer, instruction, system_prompt, key: _chat(
        tokenizer, LIDIT_INSTRUCTION + instruction, system_prompt, key
    ),
}


def register_template(
    name: str, fn: Callable[..., Template], *, system_turn: bool, adds_tokens: bool
) -> None:
    """``text.template=name`` presents prompts with ``fn(tokenizer, instruction, system_prompt, key)`` ->
    ``Template`` (``_chat`` renders a chat template; ``key`` names the section in errors). ``system_turn``:
    it places text.system_prompt (else a system prompt is refused as doing nothing); ``adds_tokens``: it
    puts tokens of its own around every prompt, besides text.instruction. A name already taken is a
    ConfigError."""
    register_variant("text.template", name, TemplateTraits(system_turn=system_turn, adds_tokens=adds_tokens))
    TEMPLATES[name] = fn
