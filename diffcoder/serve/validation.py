"""FastAPI's request-validation errors as one message a client can act on (and the field it names)."""
from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, the field it is about) for what pydantic found wrong with a request body."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    surrogate = next((e for e in errors if e.get("type") == "lone_surrogate"), None)
    if surrogate is not None:
        # Reported alone: for a union field pydantic also lists every alternative that did not match.
        return _surrogate_message(surrogate)
    loc = [str(p) for p in errors[0].get("loc", ()) if p != "body"]
    message = _body_message(errors[0], loc)
    if message:
        return message, None
    return _field_message(errors[0], loc, len(errors))


def _surrogate_message(err: dict[str, Any]) -> tuple[str, str]:
    name = ".".join(str(p) for p in err["loc"] if p != "body" and not _is_type_tag(str(p))) or "body"
    return (f"'{name}' {err['msg']}: JSON text must be valid Unicode; send a character outside the "
            "Basic Multilingual Plane as a surrogate pair (high then low), or as UTF-8"), name


def _body_message(err: dict[str, Any], loc: list[str]) -> str | None:
    """What is wrong with the body as a whole (not valid JSON, not an object, empty), if that is it."""
    kind = err.get("type", "")
    if kind == "json_invalid":  # its loc is where in the text the JSON broke
        ctx = err.get("ctx") or {}
        return f"the request body is not valid JSON ({ctx.get('error', err.get('msg'))}); send a JSON object"
    if loc:
        return None
    if kind in ("model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object"
    if kind == "missing":
        return "the request body is empty; send a JSON object"
    return None


def _field_message(err: dict[str, Any], loc: list[str], n_errors: int) -> tuple[str, str]:
    kind = err.get("type", "")
    field_name = ".".join(loc) or "body"
    tag = next((i for i, part in enumerate(loc) if _is_type_tag(part)), None)
    if tag and loc[tag - 1] in _UNION_FIELDS:
        # A union field: pydantic reports one error per alternative; say what is accepted instead.
        name = ".".join(loc[:tag])
        return f"'{name}' must be {_UNION_FIELDS[loc[tag - 1]]} (got {_shown(err.get('input'))})", name
    if kind == "missing":
        return f"'{field_name}' is required", field_name
    if kind == "extra_forbidden":
        return f"unknown field '{field_name}'; check the spelling (see docs/serving.md for the accepted fields)", field_name
    extra = f" ({n_errors - 1} more problem(s) in the body)" if n_errors > 1 else ""
    return f"'{field_name}': {err.get('msg', 'invalid value')} (got {_shown(err.get('input'))}){extra}", field_name


# Fields whose type is a union, and what to tell a client who sent something else.
_UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of strings",
    "logprobs": "a boolean or an integer",
    "content": 'a string or a list of {"type": "text", "text": ...} parts',
}


def _is_type_tag(part: str) -> bool:
    """pydantic names each alternative of a union in `loc` by its type: `str`, `list[int]`, ..."""
    return part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper()


def _shown(value: Any) -> str:
    """The value the client sent, short (its type's name when JSON cannot show it)."""
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return type(value).__name__
