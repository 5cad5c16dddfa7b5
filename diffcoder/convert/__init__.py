"""Import checkpoints from other formats (GGUF) into the Hugging Face layout diffcoder reads."""
from __future__ import annotations

from diffcoder.convert.gguf_import import ConversionReport, convert_gguf

__all__ = ["ConversionReport", "convert_gguf"]
