"""The `loraplex` command line: the parser and `main`; the handlers live in
`lorahub.commands`.

Exit codes: 0 success, 1 user error (one line on stderr naming the problem), 2 bad usage.
Every command takes `--registry DIR` (default `$LORAPLEX_HOME/registry`, else the user
cache) and, where it lists things, `--json`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lorahub.commands import (
    cmd_demo,
    cmd_doctor,
    cmd_eval,
    cmd_export,
    cmd_generate,
    cmd_learn,
    cmd_list,
    cmd_merge,
    cmd_register,
    cmd_remove,
    cmd_route,
    cmd_search,
    cmd_serve,
    cmd_show,
    cmd_train,
    cmd_train_retriever,
    default_registry,
)
from registry import AdapterError
from router import DEFAULT_ROUTER, ROUTERS

# What a user's mistake raises (a bad file, name, value or path); anything else is a bug
# and keeps its traceback.
USER_ERRORS = (AdapterError, ValueError, OSError)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="registry folder (default: $LORAPLEX_HOME/registry or the user cache)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p = argparse.ArgumentParser(prog="loraplex", description="Route and compose LoRA adapters.")
    sub = p.add_subparsers(dest="command", required=True)
    # handled before parsing (main): every flag after it is lm-evaluation-harness's own
    sub.add_parser("lm-eval", help="lm-evaluation-harness with the `loraplex` model")

    s = sub.add_parser("register", parents=[common], help="validate and store adapters")
    s.add_argument(
        "source",
        nargs="+",
        help="PEFT folders, .safetensors files, globs or hf://owner/name[@revision]",
    )
    s.add_argument("--name", help="registry name of a single source (default: its folder name)")
    s.add_argument("--examples", help="example inputs: .txt (one a line) or .jsonl with 'input'")
    s.add_argument("--description", help="what the adapter does (embedded if no examples)")
    s.add_argument("--tags", help="comma-separated tags")
    s.add_argument("--replace", action="store_true", help="replace an adapter of the same name")
    s.set_defaults(func=cmd_register)

    sub.add_parser("list", parents=[common], help="list adapters").set_defaults(func=cmd_list)
    s = sub.add_parser("show", parents=[common], help="show one adapter")
    s.add_argument("name")
    s.set_defaults(func=cmd_show)
    s = sub.add_parser("remove", parents=[common], help="remove an adapter")
    s.add_argument("name")
    s.set_defaults(func=cmd_remove)
    s = sub.add_parser("search", parents=[common], help="adapters nearest to a text")
    s.add_argument("text")
    s.add_argument("-k", type=int, default=5, help="how many (default 5)")
    s.set_defaults(func=cmd_search)
    s = sub.add_parser("merge", parents=[common], help="merge adapters into one (PEFT format)")
    s.add_argument("names", nargs="+", metavar="NAME")
    s.add_argument(
        "--method",
        required=True,
        help="linear, svd, ties, dare_linear, dare_ties, magnitude_prune or lorahub",
    )
    s.add_argument("--weights", help="comma-separated, one per adapter (default 1/n each)")
    s.add_argument("--rank", type=int, help="target rank (svd and sparsifying methods)")
    s.add_argument("--density", type=float, default=0.5, help="kept fraction (ties/dare/prune)")
    s.add_argument("--seed", type=int, default=0, help="DARE's random seed")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.set_defaults(func=cmd_merge)
    s = sub.add_parser("route", parents=[common], help="which adapters each prompt gets")
    s.add_argument("prompt", nargs="*")
    s.add_argument(
        "--prompts", help="a .txt (one prompt a line), .jsonl with 'input', or - (stdin)"
    )
    s.add_argument("-k", type=int, default=3, help="adapters per prompt (default 3)")
    s.add_argument("--router", choices=sorted(ROUTERS), default=DEFAULT_ROUTER)
    s.add_argument("--classifier", help="folder of a saved ClassifierRouter")
    s.set_defaults(func=cmd_route)

    s = sub.add_parser("generate", parents=[common], help="answer prompts with routed adapters")
    s.add_argument("prompt", nargs="*")
    s.add_argument(
        "--prompts", help="a .txt (one prompt a line), .jsonl with 'input', or - (stdin)"
    )
    s.add_argument("-k", type=int, default=3, help="adapters per prompt (default 3)")
    s.add_argument(
        "--compose", choices=["mixture", "fusion", "selection", "none"], default="mixture"
    )
    s.add_argument("--base-model", default="smollm2-135m-instruct", help="name, path or Hub id")
    s.add_argument("--router", choices=sorted(ROUTERS), default=DEFAULT_ROUTER)
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, help="makes sampling repeatable")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("train", parents=[common], help="train a LoRA adapter on a task")
    s.add_argument("task", help="a BIG-bench task name or task.json, or a .jsonl file")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--tasks-dir", help="folder of BIG-bench tasks (default: the fetched cache)")
    s.add_argument("--base-model", default="smollm2-135m-instruct")
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--lr", type=float, default=2e-4)
    s.add_argument(
        "--loraplus-ratio", type=float, default=16.0, help="lr_B / lr_A (1 = plain LoRA)"
    )
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--alpha", type=float, help="default 2 x rank")
    s.add_argument("--targets", default="q_proj,v_proj")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser(
        "train-retriever",
        parents=[common],
        help="fine-tune the embedder on the registered adapters' examples",
    )
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--epochs", type=int, default=1)
    s.set_defaults(func=cmd_train_retriever)

    s = sub.add_parser(
        "doctor", parents=[common], help="check the registry; --repair removes debris"
    )
    s.add_argument(
        "--repair", action="store_true", help="remove orphan blobs, temp files, stale indexes"
    )
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser(
        "learn",
        parents=[common],
        help="LoraHub: composition weights for a new task from a few examples",
    )
    s.add_argument("--examples", required=True, help="JSONL with input and target")
    s.add_argument("--adapters", required=True, help="comma-separated registry names")
    s.add_argument("--out", type=Path, required=True, help="folder for the composed adapter")
    s.add_argument(
        "--steps", type=int, default=40, help="evaluations (default 40, as the reference)"
    )
    s.add_argument(
        "--mode",
        choices=["fusion", "mixture"],
        default="fusion",
        help="fusion: sum w_i A_i, sum w_i B_i (the reference); mixture: sum w_i B_i A_i",
    )
    s.add_argument("--optimizer", default="NGOpt", help="a nevergrad optimizer (default NGOpt)")
    s.add_argument("--base-model", default="smollm2-135m-instruct")
    s.add_argument("--seed", type=int, default=42)
    s.set_defaults(func=cmd_learn)

    s = sub.add_parser(
        "eval", parents=[common], help="cross-task evaluation -> results.json, report.md, plots"
    )
    s.add_argument(
        "--tasks", required=True, help="comma-separated BIG-bench task names or .jsonl files"
    )
    s.add_argument(
        "--tasks-dir", help="folder of BIG-bench tasks (default: fetched from the sdist)"
    )
    s.add_argument("--protocol", choices=["iid", "ood", "fewshot"], default="iid")
    s.add_argument("--methods", help="comma-separated (default: those the protocol allows)")
    s.add_argument("--shots", type=int, default=5, help="fewshot: examples learned from")
    s.add_argument(
        "--candidates", type=int, default=20, help="fewshot: adapters composed (seeded sample)"
    )
    s.add_argument("--limit", type=int, default=50, help="prompts per task")
    s.add_argument("-k", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--base-model", default="smollm2-135m-instruct")
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=cmd_eval)

    sub.add_parser("demo", parents=[common], help="run the demo").set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "serve", parents=[common], help="an OpenAI-compatible server that routes every request"
    )
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--base-model",
        default=None,
        help="name, path or Hub id (default: SmolLM2, or what the first --upstream serves)",
    )
    s.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    s.add_argument("--upstream", help="vllm: comma-separated vLLM server URLs")
    s.add_argument("--max-lora-rank", type=int, default=16, help="vllm: the replicas' limit")
    s.add_argument("--router", choices=sorted(ROUTERS), default=DEFAULT_ROUTER)
    s.add_argument("--classifier", help="folder of a saved ClassifierRouter")
    s.add_argument(
        "--compose",
        choices=["mixture", "fusion", "selection"],
        default="mixture",
        help="what model 'auto' means (default mixture)",
    )
    s.add_argument("-k", type=int, default=3, help="adapters per request for auto (default 3)")
    s.add_argument("--max-batch", type=int, default=32, help="rows decoding at once")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    s.add_argument("--max-tokens", type=int, default=256, help="default max_tokens")
    s.add_argument("--api-key", help="require this bearer key (default: $LORAPLEX_API_KEY)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("export", parents=[common], help="write the adapters for another engine")
    s.add_argument("--format", choices=["vllm"], required=True)
    s.add_argument("dir", help="output folder")
    s.set_defaults(func=cmd_export)
    return p


# the commands that may make the registry they are given; the others only read one, and a
# mistyped --registry is an error, not a new empty registry
MAKE_A_REGISTRY = frozenset({"register", "demo"})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # every later flag is the harness's own
        return _lm_eval(argv[1:])
    args = _parser().parse_args(argv)
    args.registry_given = args.registry is not None
    args.registry = args.registry or default_registry()
    if (
        args.registry_given
        and args.command not in MAKE_A_REGISTRY
        and not Path(args.registry).exists()
    ):
        print(
            f"loraplex: error: no registry at {args.registry} "
            f"(`loraplex register SOURCE --registry {args.registry}` makes one)",
            file=sys.stderr,
        )
        return 1
    if getattr(args, "k", 1) <= 0:
        print("loraplex: error: -k must be positive", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except USER_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"loraplex: error: {message}", file=sys.stderr)
        return 1


def _lm_eval(argv: list[str]) -> int:
    """`loraplex lm-eval ...`: lm-evaluation-harness's CLI with the `loraplex` model."""
    try:
        from lorahub.harness import main as lm_eval
    except ModuleNotFoundError as e:
        print(
            f"loraplex: error: lm-eval needs `pip install 'loraplex[harness]'` ({e})",
            file=sys.stderr,
        )
        return 1
    return lm_eval(argv)


if __name__ == "__main__":
    sys.exit(main())
