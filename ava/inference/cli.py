"""`ava-generate MODEL_DIR --prompt TEXT` (or `--config FILE`): load an export and generate, streaming."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from tokenizers import Tokenizer

from ava.inference.config_file import load_inference_config
from ava.inference.errors import AvaInferenceError
from ava.inference.generate import GenerationConfig
from ava.inference.loader import load_model


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ava-generate", description="Generate text from an ava-export directory.")
    p.add_argument("model", nargs="?", help="exported model directory (or set `model` in --config)")
    p.add_argument("--config", help="YAML/JSON inference config: model, device_map, max_memory, dtype, generation")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (left-padded)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--min-new-tokens", type=int, help="do not end before this many new tokens (EOS is held back)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="go on past end-of-text (shown as a blank line) up to --max-new-tokens")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string; repeatable")
    p.add_argument("--device-map", help="cpu | cuda:N | auto")
    p.add_argument("--gpu-layers", type=int, help="first N blocks on the GPU, the rest on the CPU")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast explicitly (default: stored dtype)")
    p.add_argument("--quantize", choices=["int8"], help="int8 weight-only quantization at load")
    p.add_argument("--fallback", action="store_true", help="on OOM: partial GPU, then CPU")
    return p.parse_args(argv)


def plan_for_prompts(options: dict, path: str, prompts: list[str]) -> None:
    """Size the KV-cache estimate for this request (longest prompt + max_new_tokens, one row per
    prompt) unless the config file fixed `context_len` / `batch_size`."""
    tokenizer_file = Path(path) / "tokenizer.json"
    if "context_len" in options or not tokenizer_file.is_file():
        return  # load_model reports a missing tokenizer with the full diagnosis
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    longest = max(len(tokenizer.encode(p).ids) for p in prompts)
    options["context_len"] = longest + GenerationConfig(**options.get("generation", {})).max_new_tokens
    options.setdefault("batch_size", len(prompts))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cli = {"model": args.model, "device_map": args.device_map, "gpu_layers": args.gpu_layers, "dtype": args.dtype,
           "quantize": args.quantize, "fallback": True if args.fallback else None}
    gen = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
           "stop_at_eos": False if args.ignore_eos else None, "do_sample": True if args.sample else None,
           "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
           "repetition_penalty": args.repetition_penalty, "seed": args.seed, "stop_strings": args.stop}
    try:
        options = load_inference_config(args.config, cli, gen)
        prompts = args.prompt or options.pop("prompts", None)
        options.pop("prompts", None)
        if not prompts:
            raise AvaInferenceError("no prompt: pass --prompt TEXT (repeatable) or set `prompts` in --config")
        path = options.pop("model")
        plan_for_prompts(options, path, prompts)
        model = load_model(path, **options)
        if len(prompts) == 1:
            sys.stdout.write(prompts[0])
            model.generate(prompts[0], on_text=lambda _row, piece: (sys.stdout.write(piece), sys.stdout.flush()))
            sys.stdout.write("\n")
        else:
            for prompt, text in zip(prompts, model.generate(prompts), strict=False):
                print(f"{prompt}{text}\n---")
    except AvaInferenceError as err:
        console.print(f"[bold red]ava-generate: {type(err).__name__}:[/] {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
