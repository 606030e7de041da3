"""The service's request bodies and limits (what /docs shows)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt

MAX_K = 1000
MAX_HISTORY = 1000
MAX_BODY_BYTES = 256 * 1024


def _encodable(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"): valid Python strings that SQLite and the
    # response encoder cannot store or write.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode (a lone surrogate)") from None
    return text


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


def _trainable(text: str) -> str:
    # What training validation refuses in item text or ids: control characters (NUL...) and
    # the replacement character of undecodable bytes.
    if _CONTROL.search(text):
        raise ValueError("holds control characters or undecodable bytes (U+FFFD)")
    return text


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("is blank")
    return text


ID = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_encodable)]
# What is stored must pass training validation too; a request's history ids need not (unknown ids
# are ignored), and checking each of up to 10,000 of them per request costs throughput.
StoredID = Annotated[ID, AfterValidator(_trainable)]
Text = Annotated[str, AfterValidator(_encodable), AfterValidator(_trainable), AfterValidator(_not_blank)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: ID | None = None
    history: list[ID] | None = Field(default=None, max_length=10_000, description="recent items, oldest first")
    k: int = Field(default=10, ge=1, le=MAX_K)
    exclude_seen: bool = True


class Event(BaseModel):
    """Strict types: `true` is not a timestamp, "5" is not a weight (training validation would
    refuse the exported events). Ranges come from the model's training data (`/events` checks)."""

    model_config = ConfigDict(extra="forbid")
    user_id: StoredID
    item_id: StoredID
    timestamp: StrictInt | None = Field(default=None, ge=0, le=4_102_444_800, description="unix seconds; default now")
    weight: StrictFloat | StrictInt | None = Field(default=None, ge=-1e6, le=1e6, allow_inf_nan=False)


class NewItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: StoredID
    text: Text = Field(min_length=1, max_length=20_000)
    title: Text | None = Field(default=None, max_length=500)
