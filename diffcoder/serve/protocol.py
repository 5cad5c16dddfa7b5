"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types).

Strict mode: `"max_tokens": "16"` is a 400 that names the field, not a silent coercion.
`extra="forbid"`: a misspelt option (`"max_token"`) is a 400 instead of being ignored.
OpenAI fields that clients send by habit are accepted: what the decoder honours is used, what
cannot change the answer is ignored and named in the `x-diffcoder-ignored-fields` response
header (`ignored_fields`), and what would change the answer silently is a 400 that says so
(`unsupported_fields`). Every string must be valid Unicode (no lone UTF-16 surrogates), and
every number lies in the range where it means something.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

_STRICT = ConfigDict(extra="forbid", strict=True)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_N = 128  # OpenAI's limit; the server's --max-batch is checked when the request is queued


def _valid_unicode(text: str) -> str:
    # JSON can carry "\ud800" alone; such a string cannot be encoded, tokenized or echoed.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "lone_surrogate", "contains a lone UTF-16 surrogate ({char}) at character {pos}",
            {"char": "\\u%04x" % ord(text[exc.start]), "pos": exc.start}) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class DecoderOptions(BaseModel):
    """The fields shared by /v1/completions and /v1/chat/completions."""

    model_config = _STRICT

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # Sent by OpenAI clients and agent frameworks; see ignored_fields / unsupported_fields.
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
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
    remasking: Literal["low_confidence", "random", "left_to_right"] | None = None
    speculative: bool | None = Field(None, description="exact parallel decoding: the tokens of greedy one-token-"
                                     "per-pass decoding in fewer passes (default: the model's, where it applies)")
    include_steps: bool = Field(False, description="stream per-step denoising states (playground)")

    def unsupported_fields(self, temperature: float) -> list[tuple[str, str]]:
        """(field, why) for every OpenAI option whose value this server cannot honour and that
        would change the answer; `temperature` is the one the decoder will use."""
        out: list[tuple[str, str]] = []
        if self.top_p is not None and self.top_p != 1.0 and temperature > 0:
            out.append(("top_p", f"top_p ({self.top_p:g}) is not supported by the block-diffusion decoder and "
                                 f"would change what temperature {temperature:g} samples; omit top_p, send 1, "
                                 "or decode greedily with temperature 0"))
        if self.response_format is not None and self.response_format.type != "text":
            out.append(("response_format", f"response_format {self.response_format.type!r} is not supported: "
                                           "the decoder cannot constrain its output to JSON; omit response_format "
                                           'or send {"type": "text"}'))
        if self.tool_choice is not None and self.tool_choice not in ("none", "auto"):
            shown = self.tool_choice if isinstance(self.tool_choice, str) else "a named function"
            out.append(("tool_choice", f"tool_choice {shown!r} asks for a tool call, and this server never makes "
                                       "tool calls; omit tool_choice or send 'auto' or 'none'"))
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

    def ignored_fields(self) -> list[str]:
        """Fields sent with a value that has no effect here (and cannot change the answer):
        no storage, no tool calls, no per-user tracking, and top_p without sampling."""
        sent = {
            "store": bool(self.store),
            "metadata": bool(self.metadata),
            "parallel_tool_calls": self.parallel_tool_calls is not None,
            "tools": bool(self.tools),
            "user": self.user is not None,
            "top_p": self.top_p is not None and self.top_p != 1.0,
        }
        return [name for name, given in sent.items() if given]


PromptType = Union[Text, list[Text], list[int], list[list[int]]]


class CompletionRequest(DecoderOptions):
    prompt: PromptType = Field(..., description="text, token ids, or a list of either")
    suffix: Text | None = None
    echo: bool = False


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only on an assistant turn that made tool calls (checked in plan_chat).
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant turns of a tool-using conversation
    tool_call_id: Text | None = None  # the tool call a "tool" message answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(DecoderOptions):
    messages: list[ChatMessage]
