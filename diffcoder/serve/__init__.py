"""Serving: an OpenAI-compatible HTTP API with request batching, SSE streaming and a
live denoising playground. `diffcoder.serve.app.create_app` builds the app; `diffcoder serve`
runs it with uvicorn. Importing this package stays light (no torch) so the CLI starts fast.
"""
