"""`diffcoder serve`: the OpenAI-compatible HTTP server and the denoising playground."""
from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from diffcoder.engine.cli import add_model_flags, add_runner_flag

    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API with a live denoising playground",
        description="Serve a model: /v1/completions, /v1/chat/completions, /v1/models, /health, "
        "/metrics, and the playground page at /. See docs/serving.md.",
    )
    add_model_flags(p)  # --model, --device, --dtype: the same defaults as generate, chat and eval
    p.add_argument("--model-name", default=None,
                   help="the name clients send as 'model' (default: the model directory's name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, loopback only; use 0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free port)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="most rows (prompts x n) decoded together in one batch (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a batch; more get 429 with Retry-After (default 64)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may take, waiting included, before it fails with 408 (default 300)")
    p.add_argument("--api-key", default=os.environ.get("DIFFCODER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DIFFCODER_API_KEY, else no key)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body in bytes; larger bodies get 413 (default 1 MiB)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the engine waits after the first waiting request for others to batch "
                        "with it, in ms (default 10; 0 = start at once)")
    p.add_argument("--stall-timeout", type=float, default=120.0,
                   help="/health answers 503 when the engine has made no progress for this many seconds "
                        "while requests wait or run (default 120)")
    add_runner_flag(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn log level (default info)")
    p.set_defaults(func=run_serve)


def load_served(args: argparse.Namespace) -> tuple[object, str]:
    """The model to serve and the id clients send: --model as everywhere else (a directory, or a
    `diffcoder pull` name pulled on first use, --fallback-tiny honoured), named by --model-name,
    else by the directory's or the pulled model's name."""
    import diffcoder
    from diffcoder.engine.cli import load_model

    model = load_model(args)  # clears args.model when --fallback-tiny fell back to the default
    source = args.model or str(diffcoder.default_model_dir(announce=False))
    return model, args.model_name or os.path.basename(os.path.normpath(source))


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from diffcoder.serve.app import ServeConfig, create_app

    # ValueError / FileNotFoundError: the CLI prints them as one line and exits 2.
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535 (0 picks a free port; got {args.port})")
    config = ServeConfig(  # raises ValueError with the flag to fix
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes,
        batch_window_s=args.batch_window_ms / 1000,
        runner=args.runner,
        stall_timeout=args.stall_timeout,
    )
    model, name = load_served(args)
    app = create_app(model, model_name=name, config=config)
    where = f"http://{args.host}:{args.port}/" if args.port else f"{args.host} (a free port; uvicorn prints it)"
    print(f"serving {name!r} on {where} (playground at /, API at /v1)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this machine "
              "can use the model", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
