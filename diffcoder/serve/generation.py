"""From a validated request body to engine rows, and from engine events back to text.

`plan_completion` / `plan_chat` check everything that depends on the model (context length,
token ids, step/block divisibility, chat template, FIM tokens) and raise `APIError` 4xx with
what to fix, so nothing a client sends reaches the engine in a state that could fail there.
`RowText` turns one row's committed blocks into OpenAI text deltas: it cuts at EOS, at
`max_tokens` and at stop strings, and holds back a tail that might be the start of a stop
string or half of a UTF-8 character.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffcoder.engine.settings import DEFAULTS, speculative_applies
from diffcoder.serve.errors import APIError, bad_request
from diffcoder.serve.protocol import ChatRequest, CompletionRequest, DecoderOptions
from diffcoder.serve.scheduler import BatchKey

DEFAULT_MAX_TOKENS_COMPLETION = 16  # OpenAI's default for /v1/completions
DEFAULT_MAX_TOKENS_CHAT = 256
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # each stop string is looked for at the end of every block's text


@dataclass
class ModelInfo:
    """What the HTTP layer needs to know about the served model."""

    name: str
    model: Any
    tokenizer: Any
    context_length: int
    vocab_size: int
    eos_id: int | None
    mask_id: int | None
    defaults: dict[str, Any]

    @classmethod
    def from_model(cls, model: Any, name: str) -> "ModelInfo":
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise ValueError("the model directory has no tokenizer; the server needs one to read text prompts")
        cfg = model.config
        return cls(
            name=name,
            model=model,
            tokenizer=tok,
            context_length=int(cfg.max_position_embeddings),
            vocab_size=int(cfg.vocab_size),
            eos_id=tok.eos_id if tok.eos_id is not None else getattr(cfg, "eos_token_id", None),
            mask_id=getattr(model, "mask_id", None),
            defaults=dict(getattr(model, "generation_defaults", None) or {}),
        )


@dataclass
class Plan:
    """A request, ready for the scheduler: one row per (prompt, sample)."""

    prompts: list[list[int]]  # per row
    echo_texts: list[str]  # per row: what `echo` puts in front of the completion
    key: BatchKey
    max_tokens: int
    stop: list[str]
    stream: bool
    include_usage: bool
    want_steps: bool
    prompt_tokens: int  # usage: each distinct prompt counted once
    ignored: list[str] = field(default_factory=list)  # request fields that had no effect


def _temperature(req: DecoderOptions, info: ModelInfo) -> float:
    return float(req.temperature if req.temperature is not None
                 else info.defaults.get("temperature", DEFAULTS["temperature"]))


def _check_model(req: DecoderOptions, info: ModelInfo) -> None:
    if req.model is not None and req.model != info.name:
        raise APIError(
            404,
            f"model {req.model!r} is not served here; this server serves {info.name!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    for name, why in req.unsupported_fields(_temperature(req, info)):
        raise bad_request(why, name)


def _stops(req: DecoderOptions) -> list[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"stop has {len(stop)} strings; send at most {MAX_STOP_STRINGS}", "stop")
    if any(s == "" for s in stop):
        raise bad_request("stop strings must not be empty", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad_request(f"stop strings must be at most {MAX_STOP_CHARS} characters long", "stop")
    return stop


def _batch_key(req: DecoderOptions, info: ModelInfo, prompt_lens: list[int], max_tokens: int, job_tag: int) -> BatchKey:
    """Decoder settings from the request, falling back to the model's generation defaults."""
    d = info.defaults
    block = req.block_length or int(d.get("block_length", DEFAULTS["block_length"]))
    gen_length = -(-max_tokens // block) * block  # max_tokens rounded up to whole blocks
    n_blocks = gen_length // block
    # One token per forward pass is the most steps can do: more passes find no mask to fill
    # (a larger value decodes exactly as gen_length does, so it is clamped to that).
    steps = min(req.steps, gen_length) if req.steps is not None else gen_length
    if steps % n_blocks:
        raise bad_request(
            f"steps ({steps}) must be a multiple of the number of blocks ({n_blocks} = max_tokens "
            f"{max_tokens} rounded up to {gen_length} / block_length {block}); try steps={n_blocks * max(1, round(steps / n_blocks))}",
            "steps",
        )
    longest = max(prompt_lens)
    # The engine checks this too; this message also explains the rounding of max_tokens.
    if longest + gen_length > info.context_length:
        raise bad_request(
            f"prompt ({longest} tokens) + max_tokens rounded up to the block length ({gen_length}) "
            f"exceeds the model's context of {info.context_length} tokens; shorten the prompt or lower max_tokens",
            "max_tokens",
        )
    temperature = _temperature(req, info)
    threshold = req.threshold if req.threshold is not None else d.get("threshold")
    sampled = temperature > 0
    remasking = req.remasking or str(d.get("remasking", DEFAULTS["remasking"]))
    speculative = req.speculative
    if speculative is None:  # the model's default applies where it can: greedy, one token per pass
        speculative = bool(d.get("speculative", DEFAULTS["speculative"])) and speculative_applies(
            temperature=temperature, remasking=remasking, threshold=threshold, steps=steps, gen_length=gen_length)
    return BatchKey(
        gen_length=gen_length,
        steps=steps,
        block_length=block,
        threshold=None if threshold is None else float(threshold),
        remasking=remasking,
        temperature=float(temperature),
        shift=bool(d.get("shift", DEFAULTS["shift"])),
        speculative=speculative,
        seed=req.seed if sampled else None,
        solo=job_tag if sampled and req.seed is not None else None,
    )


def _check_ids(ids: list[int], info: ModelInfo, param: str) -> list[int]:
    if not ids:
        raise bad_request(f"{param} is empty; send at least one token", param)
    bad = [t for t in ids if not 0 <= t < info.vocab_size or t == info.mask_id]
    if bad:
        raise bad_request(
            f"{param} has token id {bad[0]} outside the vocabulary [0, {info.vocab_size}) or equal to the mask id",
            param,
        )
    return ids


def _fim_prompt(info: ModelInfo, prefix: str, suffix: str) -> list[int]:
    """The suffix-prefix-middle prompt `diffcoder.infill` decodes (the tokenizer owns the layout)."""
    try:
        return info.tokenizer.fim_prompt(prefix, suffix)
    except ValueError as exc:
        raise bad_request(f"suffix (infilling) is unavailable for this model: {exc}", "suffix") from exc


def _check_with_engine(key: BatchKey, prompts: list[list[int]], info: ModelInfo) -> None:
    """Run the engine's own argument checks now, so a bad request fails alone with a 400."""
    from diffcoder.engine.decoding import DecodeArgs, validate_args

    args = DecodeArgs(key.steps, key.gen_length, key.block_length, key.temperature, key.remasking,
                      key.threshold, key.shift, info.eos_id, info.mask_id, key.seed, speculative=key.speculative)
    try:
        validate_args(args, prompts, info.vocab_size, info.context_length)
    except ValueError as exc:
        raise bad_request(str(exc)) from exc


def _max_tokens(req: DecoderOptions, default: int, info: ModelInfo, prompts: list[list[int]]) -> int:
    """The client's max_tokens; when unset, the default shrunk to what fits in the context."""
    asked = req.max_completion_tokens or req.max_tokens
    if asked:
        return asked
    block = req.block_length or int(info.defaults.get("block_length", DEFAULTS["block_length"]))
    room = (info.context_length - max(len(p) for p in prompts)) // block * block
    return min(default, room) if room >= block else default  # no room: the context check explains


def plan_completion(req: CompletionRequest, info: ModelInfo, job_tag: int) -> Plan:
    _check_model(req, info)
    p = req.prompt
    if isinstance(p, str):
        texts: list[str | None] = [p]
        id_lists: list[list[int] | None] = [None]
    elif p and all(isinstance(x, int) for x in p):
        texts, id_lists = [None], [list(p)]  # type: ignore[list-item]
    elif p and all(isinstance(x, str) for x in p):
        texts, id_lists = list(p), [None] * len(p)  # type: ignore[arg-type]
    elif p and all(isinstance(x, list) for x in p):
        texts, id_lists = [None] * len(p), [list(x) for x in p]  # type: ignore[union-attr]
    else:
        raise bad_request("prompt is empty; send a string, a list of strings, or token ids", "prompt")
    tok = info.tokenizer
    if req.suffix is not None and any(t is None for t in texts):
        raise bad_request("suffix (infilling) needs the prompt as text, not token ids", "suffix")
    prompts: list[list[int]] = []
    echoes: list[str] = []
    for text, ids in zip(texts, id_lists):
        if ids is None:
            if req.suffix is not None:
                ids = _fim_prompt(info, text or "", req.suffix)
            else:
                ids = tok.encode(text or "")
                if not ids and tok.bos_id is not None:
                    ids = [tok.bos_id]  # an empty prompt means "start of a document"
        ids = _check_ids(ids, info, "prompt")
        prompts.append(ids)
        echoes.append(text if text is not None else tok.decode(ids))
    return _plan(req, info, prompts, echoes if req.echo else [""] * len(prompts), DEFAULT_MAX_TOKENS_COMPLETION, job_tag)


def plan_chat(req: ChatRequest, info: ModelInfo, job_tag: int) -> Plan:
    _check_model(req, info)
    if not req.messages:
        raise bad_request("messages is empty; send at least one message", "messages")
    messages = []
    for i, m in enumerate(req.messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise bad_request(f"messages[{i}] ({m.role}) has no content; only an assistant turn with "
                              "tool_calls may omit it", f"messages.{i}.content")
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        # Templates that know tool calls render them; the others show the content only.
        if m.tool_calls:
            message["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    try:
        ids = info.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as exc:
        raise bad_request(f"messages cannot be rendered with the model's chat template: {exc}", "messages") from exc
    ids = _check_ids(list(ids), info, "messages")
    return _plan(req, info, [ids], [""], DEFAULT_MAX_TOKENS_CHAT, job_tag)


def _plan(
    req: DecoderOptions, info: ModelInfo, prompts: list[list[int]], echoes: list[str], default_max: int, job_tag: int
) -> Plan:
    max_tokens = _max_tokens(req, default_max, info, prompts)
    key = _batch_key(req, info, [len(p) for p in prompts], max_tokens, job_tag)
    _check_with_engine(key, prompts, info)
    rows = [p for p in prompts for _ in range(req.n)]
    return Plan(
        prompts=rows,
        echo_texts=[e for e in echoes for _ in range(req.n)],
        key=key,
        max_tokens=max_tokens,
        stop=_stops(req),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        want_steps=req.include_steps,
        prompt_tokens=sum(len(p) for p in prompts),
        ignored=req.ignored_fields(),
    )


@dataclass
class RowText:
    """The text of one generated row, built block by block."""

    tokenizer: Any
    eos_id: int | None
    max_tokens: int
    stops: list[str]
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters already handed to the client
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0

    def add_block(self, block_tokens: list[int], finished: bool, finish_reason: str | None) -> str:
        """Append one committed block; return the text delta that is now safe to send."""
        if self.finish_reason is not None:
            return ""
        self.tokens.extend(block_tokens)
        toks = self.tokens[: self.max_tokens]
        reason = None
        if self.eos_id is not None and self.eos_id in toks:
            toks = toks[: toks.index(self.eos_id)]
            reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            reason = "length"
        elif finished:
            reason = finish_reason or "length"
        text = self.tokenizer.decode(toks)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        self.text, self.completion_tokens = text, len(toks)
        if reason is not None:
            self.finish_reason = reason
            return self._emit(len(text))
        return self._emit(self._safe_end(text))

    def _safe_end(self, text: str) -> int:
        """Hold back what could still become a stop string or a multi-byte character."""
        end = len(text)
        for s in self.stops:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text.endswith(s[:k]):
                    end = min(end, len(text) - k)
                    break
        while end > 0 and text[end - 1] == "\ufffd":
            end -= 1
        return max(end, self.sent)

    def _emit(self, end: int) -> str:
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta
