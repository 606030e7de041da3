"""The service's request bodies and limits (what /docs shows)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt

from serving.store import id_problem

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
    # What training validation refuses in item text: control characters (NUL...; tab and newline
    # are text) and the replacement character of undecodable bytes.
    if _CONTROL.search(text):
        raise ValueError("holds control characters or undecodable bytes (U+FFFD)")
    return text


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("is blank")
    return text


def _stored_id(text: str) -> str:
    problem = id_problem(text, "the id")
    if problem:
        raise ValueError(problem.removeprefix("the id "))
    return text


ID = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_encodable)]
# What is stored must pass the export (the store's one rule for ids); a request's history ids
# need not (unknown ids are ignored), and checking each of up to 10,000 of them per request
# costs throughput.
StoredID = Annotated[ID, AfterValidator(_stored_id)]


def _text(max_chars: int) -> Any:
    # The length bound on the string itself: placed after the validators it reads "items".
    return Annotated[str, Field(max_length=max_chars), AfterValidator(_encodable), AfterValidator(_trainable),
                     AfterValidator(_not_blank)]


ItemText, Title = _text(20_000), _text(500)


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: ID | None = None
    history: list[ID] | None = Field(default=None, max_length=10_000, description="recent items, oldest first")
    # Strict: `true` is not a k, "no" is not a bool (a client sending them has a bug to hear of).
    k: StrictInt = Field(default=10, ge=1, le=MAX_K)
    exclude_seen: StrictBool = True


class Event(BaseModel):
    """Strict types: `true` is not a timestamp, "5" is not a weight (training validation would
    refuse the exported events). Ranges come from the model's training data (`/events` checks)."""

    model_config = ConfigDict(extra="forbid")
    user_id: StoredID
    item_id: StoredID
    timestamp: StrictInt | None = Field(default=None, ge=0, le=4_102_444_800, description="unix seconds; default now")
    # Strict float takes integers too; `true` and "5" are refused. (On a StrictFloat | StrictInt
    # union the range was checked after it, where NaN failed as "greater than or equal to -1000000".)
    weight: Annotated[float, Field(strict=True, ge=-1e6, le=1e6, allow_inf_nan=False)] | None = None


class NewItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: StoredID
    text: ItemText
    title: Title | None = None
