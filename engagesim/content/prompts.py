"""The prompt recipe of the Adobe content-simulation systems, one builder for training and for inference.

A post's text is generated from what a brand knows before posting: who posts
(account and company), when, what media it carries (and what the image
shows, as a caption) and how many likes it aims for. Training examples and
generation requests go through ``build_prompt`` so the model never sees a
prompt shape at inference that it was not tuned on.

Template (fields left out when unknown)::

    Write a tweet for the account @{account} ({company}).
    Posted on {weekday} {day} {month} {year} at {HH:MM} UTC.
    Media: {kinds}. The image shows: {caption}.
    Aim for about {likes} likes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class PostContext:
    """What is known about a post before it is written."""

    account: str
    created_at: datetime
    company: str | None = None
    caption: str | None = None
    media_kinds: tuple[str, ...] = ()
    target_likes: int | None = None


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = " ".join(str(value).split())
    return value or None


def build_prompt(ctx: PostContext) -> str:
    """The user turn of the chat: one instruction line per known fact."""
    company = _clean(ctx.company)
    lines = [f"Write a tweet for the account @{ctx.account}" + (f" ({company})." if company else ".")]
    when = ctx.created_at
    lines.append(f"Posted on {when:%A} {when.day} {when:%B %Y} at {when:%H:%M} UTC.")
    if ctx.media_kinds:
        media = f"Media: {', '.join(ctx.media_kinds)}."
        caption = _clean(ctx.caption)
        lines.append(media + (f" The image shows: {caption}." if caption else ""))
    else:
        lines.append("Media: none (text only).")
    if ctx.target_likes is not None:
        lines.append(f"Aim for about {int(ctx.target_likes)} likes.")
    return "\n".join(lines)


def chat(prompt: str, answer: str | None = None) -> list[dict[str, str]]:
    """Chat messages for an instruction-tuned model's template (the answer only when training)."""
    messages = [{"role": "user", "content": prompt}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages
