"""Command line: ``gpt2serve generate --config configs/tiny.yaml --prompt "Hello"`` (``python -m gpt2serve.engine``)."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _generate(args: argparse.Namespace) -> None:
    from gpt2serve import EngineConfig, LLMEngine, SamplingParams

    overrides = {k: v for k, v in {"load_format": args.load_format, "model": args.model}.items() if v}
    config = EngineConfig.from_yaml(args.config, **overrides) if args.config else EngineConfig(**overrides)
    engine = LLMEngine(config)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or [])
    start = time.monotonic()
    engine.add_request("cli", args.prompt, params, stream=True)
    first, n_tokens = None, 0
    print(args.prompt, end="", flush=True)
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.outputs:
                first = first or time.monotonic()
                n_tokens += len(c.token_ids)
                print(c.text, end="", flush=True)
    end = time.monotonic()
    decode = (n_tokens - 1) / (end - first) if first and n_tokens > 1 and end > first else float("nan")
    print(f"\n[{n_tokens} tokens, TTFT {1000 * ((first or end) - start):.0f} ms, {decode:.1f} tok/s after the first]",
          file=sys.stderr)


def _make_tiny_model(args: argparse.Namespace) -> None:
    from gpt2serve.engine.tiny_model import build_tiny_checkpoint

    print(build_tiny_checkpoint(args.path, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head))


def _make_dummy_model(args: argparse.Namespace) -> None:
    from gpt2serve.engine.tiny_model import build_dummy_model_dir

    print(build_dummy_model_dir(args.path, like=args.like))


def _tour(args: argparse.Namespace) -> None:
    import json
    from dataclasses import asdict

    from transformers.utils import logging as hf_logging

    from gpt2serve.engine.tour import print_demos, run_tour

    # Each demo starts an engine of its own: the start-up lines would bury the tables.
    logging.getLogger("gpt2serve.engine").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    start = time.monotonic()
    demos = run_tour(args.model, threads=args.threads)
    print_demos(demos)
    print(f"[tour: {time.monotonic() - start:.1f} s]", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model or "tiny (built for this run)", "demos": [asdict(d) for d in demos]},
                      f, indent=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gpt2serve")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream one completion to the terminal")
    gen.add_argument("--config", help="engine YAML or Ray Serve config (its first application's args.engine)")
    gen.add_argument("--model")
    gen.add_argument("--load-format", choices=["auto", "safetensors", "pt", "dummy"])
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append")
    gen.set_defaults(func=_generate)
    tiny = sub.add_parser("make-tiny-model", help="write a tiny random GPT-2 checkpoint with a trained tokenizer")
    tiny.add_argument("path")
    tiny.add_argument("--n-layer", type=int, default=2)
    tiny.add_argument("--n-embd", type=int, default=64)
    tiny.add_argument("--n-head", type=int, default=4)
    tiny.set_defaults(func=_make_tiny_model)
    dummy = sub.add_parser("make-dummy-model", help="write a published GPT-2's config and a tokenizer of its "
                           "vocabulary size trained here, for load_format: dummy (no weights, no download)")
    dummy.add_argument("path")
    dummy.add_argument("--like", default="gpt2", help="gpt2, gpt2-medium, gpt2-large or gpt2-xl")
    dummy.set_defaults(func=_make_dummy_model)
    tour = sub.add_parser("tour", help="small measured demos of the KV cache, batching and sampling (CPU)")
    tour.add_argument("--model", help="a checkpoint directory; default: build the tiny one in a temporary directory")
    tour.add_argument("--json", help="also write the tables' rows to this file")
    tour.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    tour.set_defaults(func=_tour)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
