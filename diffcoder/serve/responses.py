"""OpenAI's response objects for one request (a whole response, stream chunks, usage), and the
playground's denoising events (`diffcoder.denoise.*`). Formatting only: the text comes from the
request's rows (generation.RowText), the timing from the job's events (stream.py).
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from diffcoder.serve.generation import ModelInfo, Plan, RowText


class ResponseFormat:
    """The objects one request's responses are made of: a completion (`chat=False`) or a chat completion."""

    def __init__(self, plan: Plan, info: ModelInfo, chat: bool) -> None:
        self.plan, self.info, self.chat = plan, info, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.info.name}

    def usage(self, rows: list[RowText]) -> dict[str, int]:
        done = sum(row.completion_tokens for row in rows)
        return {"prompt_tokens": self.plan.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.plan.prompt_tokens + done}

    # -- a whole response ---------------------------------------------------------------------
    def response(self, rows: list[RowText]) -> dict[str, Any]:
        choices = []
        for r, row in enumerate(rows):
            if self.chat:
                choices.append({"index": r, "message": {"role": "assistant", "content": row.text},
                                "logprobs": None, "finish_reason": row.finish_reason})
            else:
                choices.append({"index": r, "text": self.plan.echo_texts[r] + row.text, "logprobs": None,
                                "finish_reason": row.finish_reason})
        out = self._head("chat.completion" if self.chat else "text_completion")
        out.update(choices=choices, usage=self.usage(rows))
        return out

    # -- a stream -----------------------------------------------------------------------------
    def chunk(self, r: int, text: str, finish: str | None, first: bool) -> dict[str, Any]:
        """Row r's next text; a row's first chunk carries the role (chat) or the echoed prompt."""
        if self.chat:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": r, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            if first:
                text = self.plan.echo_texts[r] + text
            choice = {"index": r, "text": text, "logprobs": None, "finish_reason": finish}
        out = self._stream_head()
        out["choices"] = [choice]
        return out

    def usage_chunk(self, rows: list[RowText]) -> dict[str, Any]:
        out = self._stream_head()
        out.update(choices=[], usage=self.usage(rows))
        return out

    def _stream_head(self) -> dict[str, Any]:
        return self._head("chat.completion.chunk" if self.chat else "text_completion")

    # -- the playground's denoising events ----------------------------------------------------
    def denoise_start(self) -> dict[str, Any]:
        k = self.plan.key
        return {"object": "diffcoder.denoise.start", "id": self.id, "gen_length": k.gen_length,
                "max_tokens": self.plan.max_tokens, "block_length": k.block_length, "steps": k.steps,
                "threshold": k.threshold, "prompt_tokens": [len(p) for p in self.plan.prompts]}

    def denoise_step(self, r: int, step: int, ev: Any) -> dict[str, Any]:
        """Row r's `step`-th denoising step: which positions were committed, to what, how confidently."""
        tok = self.info.tokenizer
        tokens = [int(t) for t in ev.tokens]
        return {"object": "diffcoder.denoise.step", "index": r, "step": step,
                "block_index": int(ev.block_index), "positions": [int(p) for p in ev.positions],
                "tokens": tokens, "texts": [tok.decode([t]) for t in tokens],
                "confidences": [round(float(c), 4) for c in ev.confidences]}

    def denoise_stats(self, rows: list[RowText], seconds: float, forward_passes: int) -> dict[str, Any]:
        tokens = sum(row.completion_tokens for row in rows)
        per_row = tokens / max(1, len(rows))
        return {"object": "diffcoder.denoise.stats", "id": self.id, "completion_tokens": tokens,
                "seconds": round(seconds, 4), "forward_passes": forward_passes,
                "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
                "forward_passes_per_token": round(forward_passes / per_row, 3) if per_row else None,
                "texts": [row.text for row in rows],
                "answer_tokens": [row.completion_tokens for row in rows]}
