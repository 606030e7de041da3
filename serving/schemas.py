"""The service's request bodies and limits (what /docs shows)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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


ID = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_encodable)]
Text = Annotated[str, AfterValidator(_encodable)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: ID | None = None
    history: list[ID] | None = Field(default=None, max_length=10_000, description="recent items, oldest first")
    k: int = Field(default=10, ge=1, le=MAX_K)
    exclude_seen: bool = True


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: ID
    item_id: ID
    timestamp: int | None = Field(default=None, ge=0, le=4_102_444_800, description="unix seconds; default now")
    weight: float | None = Field(default=None, ge=-1e6, le=1e6)


class NewItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: ID
    text: Text = Field(min_length=1, max_length=20_000)
    title: Text | None = Field(default=None, max_length=500)
