"""`cptjax eval | report | generate | merge` arguments: thin parsing over the library.

What CPT did to a model: held-out numbers (eval_models.py), a run's report (report.py), text
(generate.py) and merges back toward the base (merge.py, merge_sweep.py).
"""

from __future__ import annotations

import argparse

from cptjax.dtypes import FLOAT_NAMES
from cptjax.errors import CptjaxError

COMMANDS = ("eval", "report", "generate", "merge")
_MODEL_HELP = "an HF folder or a cptjax checkpoint (or a run folder); PATH@STEP for one checkpoint step"
_DATA_HELP = ("a held-out set NAME=SPEC: SPEC is TYPE:PATHS (code=text:'heldout/*.py', "
              "wiki=jsonl:heldout/wiki.jsonl) or a YAML mapping of the set's keys "
              "(code='{type: jsonl, paths: [h.jsonl], max_docs: 200}'); repeatable")


def _add_eval_data(parser, flag: str) -> None:
    parser.add_argument(flag, dest="data", action="append", default=[], metavar="NAME=SPEC", help=_DATA_HELP)
    parser.add_argument("--data-config", metavar="FILE", help="a YAML file with an eval_sets list (a run's "
                        "config.yaml works: its seq_len and batch size become the defaults)")
    parser.add_argument("--domain", action="append", default=[], metavar="NAME",
                        help="a set that measures adaptation (repeatable; default: the first set); "
                        "the others measure forgetting")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default: the run's, else "
                        "min(2048, max_position_embeddings))")
    parser.add_argument("--batch-size", type=int, help="rows per batch (default: the run's, else 8)")
    parser.add_argument("--dtype", default="float32", choices=FLOAT_NAMES,
                        help="parameters and compute (default float32)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the models' own)")


def add_measure_commands(commands) -> None:
    """Adds the four commands to the `cptjax` command's subparsers."""
    ev = commands.add_parser("eval", help="held-out loss, perplexity and bits/byte of models; the first "
                             "model is the reference for adaptation and forgetting")
    ev.add_argument("--model", action="append", default=[], required=True, help=_MODEL_HELP + "; repeatable")
    _add_eval_data(ev, "--data")
    ev.add_argument("--out", help="new folder for eval.json and eval.md (default: print only)")

    gen = commands.add_parser("generate", help="sample text from a model (greedy by default)")
    gen.add_argument("--model", required=True, help=_MODEL_HELP)
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1: off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=FLOAT_NAMES)
    gen.add_argument("--tokenizer", help="tokenizer folder (default: the model's own)")


def run_measure_command(args: argparse.Namespace) -> None:
    if args.command == "eval":
        _eval(args)
    elif args.command == "generate":
        _generate(args)


def _eval_inputs(args) -> tuple[list, dict]:
    """The eval sets of --data and --data-config, and seq_len / batch_size (flags win)."""
    from cptjax.eval_models import DEFAULT_BATCH_SIZE, eval_sets_from_file, parse_eval_spec

    sets, defaults = [], {}
    if args.data_config:
        sets, defaults = eval_sets_from_file(args.data_config)
    sets += [parse_eval_spec(spec) for spec in args.data]
    return sets, {"seq_len": args.seq_len or defaults.get("seq_len"),
                  "batch_size": args.batch_size or defaults.get("batch_size", DEFAULT_BATCH_SIZE)}


def _eval(args) -> None:
    from cptjax.atomic_dir import check_output_dir
    from cptjax.eval_models import evaluate_models, write_report
    from cptjax.paths import user_path

    if args.out:
        check_output_dir(user_path(args.out, "--out"))  # before any work
    sets, sizes = _eval_inputs(args)
    report = evaluate_models(args.model, sets, domain=args.domain, dtype=args.dtype,
                             tokenizer=args.tokenizer, **sizes)
    print(report.markdown(), end="")
    if args.out:
        print(f"wrote {write_report(report, args.out)}/eval.json and eval.md")


def _generate(args) -> None:
    from cptjax.generate import Generator, Sampling
    from cptjax.weights import split_step

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    path, step = split_step(args.model)
    result = Generator(path, step, dtype=args.dtype, tokenizer=args.tokenizer).generate(args.prompt, sampling)
    print(result.prompt + result.text)
    how = "greedy" if sampling.temperature == 0 else (f"temperature {sampling.temperature}, top-p "
                                                      f"{sampling.top_p}, seed {sampling.seed}")
    end = "end of sequence" if result.ended else f"--max-new-tokens {sampling.max_new_tokens}"
    print(f"[{result.model}: {result.new_tokens} new tokens, {how}, stopped at {end}]")


def check_alpha_list(text: str) -> list[float]:
    """'0,0.25,1' -> [0.0, 0.25, 1.0], each in [0, 1]."""
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise CptjaxError(f"--alpha {text!r}: expected a number or a comma-separated list such as "
                          "0,0.25,0.5,0.75,1") from None
    if not alphas:
        raise CptjaxError("--alpha: give a number in [0, 1]")
    for alpha in alphas:
        if not 0 <= alpha <= 1:
            raise CptjaxError(f"--alpha {alpha:g}: must be in [0, 1] (0: the base, 1: the tuned model)")
    return alphas
