"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types).

Strict mode: `"max_tokens": "16"` is a 400 that names the field, not a silent coercion.
`extra="forbid"`: a misspelt option (`"max_token"`) is a 400 instead of being ignored.
OpenAI fields we cannot honour are accepted only at their neutral value and otherwise
rejected with a message (see `unsupported_fields`).
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class DecoderOptions(BaseModel):
    """The fields shared by /v1/completions and /v1/chat/completions."""

    model_config = _STRICT

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields without a diffusion-decoder meaning: only their neutral values pass.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    best_of: int | None = None
    # Extensions: the block-diffusion decoder's own settings.
    steps: int | None = Field(None, ge=1, description="denoising steps over the whole generation")
    block_length: int | None = Field(None, ge=1)
    threshold: float | None = Field(None, gt=0.0, le=1.0)
    remasking: Literal["low_confidence", "random"] | None = None
    include_steps: bool = Field(False, description="stream per-step denoising states (playground)")

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """(field, why) for every OpenAI option set to a value this server cannot honour."""
        out: list[tuple[str, str]] = []
        if self.top_p is not None and self.top_p != 1.0:
            out.append(("top_p", "top_p is not supported by the block-diffusion decoder; omit it or send 1.0"))
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                out.append((name, f"{name} is not supported; omit it or send 0"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported; omit it"))
        if self.logprobs not in (None, False, 0) or self.top_logprobs not in (None, 0):
            out.append(("logprobs", "logprobs are not supported; omit logprobs/top_logprobs"))
        if self.best_of not in (None, 1):
            out.append(("best_of", "best_of is not supported; use n for several samples"))
        return out


PromptType = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(DecoderOptions):
    prompt: PromptType = Field(..., description="text, token ids, or a list of either")
    suffix: str | None = None
    echo: bool = False


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(DecoderOptions):
    messages: list[ChatMessage]
