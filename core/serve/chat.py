"""Chat messages turned into the one prompt a language model continues.

GPT Lab's own models (and GPT-2, GPT-Neo) were never trained on a chat format, so the messages
become a plain transcript, one ``role: content`` line per message, ending in ``assistant:`` for the
model to continue:

    system: You are terse.
    user: Who is Romeo?
    assistant:

and generation also stops where the model starts writing the user's next turn (``\\nuser:``), as
if it were a stop string the client sent. A Hugging Face tokenizer that ships a chat template
(instruction-tuned models) formats the messages its own way instead, with its generation prompt.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import LabError, first_line

if TYPE_CHECKING:
    from ..models.loading import LoadedModel

TRANSCRIPT_STOP = "\nuser:"


def transcript(messages: list[dict[str, str]]) -> str:
    """``role: content`` lines ending in ``assistant:`` (the module docstring's format)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def chat_prompt(lm: "LoadedModel", messages: list[dict[str, str]]) -> tuple[str, list[str]]:
    """``(prompt, extra stop strings)`` for ``messages``: the tokenizer's chat template when it has
    one, else the transcript with :data:`TRANSCRIPT_STOP`."""
    try:
        prompt = lm.tokenizer.apply_chat_template(messages)
    except Exception as e:  # templates are Jinja programs: they raise what they like (roles out of order...)
        raise LabError(f"The model's chat template refused these messages ({first_line(e)[:200]}); check the "
                       f"roles and their order.") from None
    if prompt is None:
        return transcript(messages), [TRANSCRIPT_STOP]
    return prompt, []


__all__ = ["TRANSCRIPT_STOP", "transcript", "chat_prompt"]
