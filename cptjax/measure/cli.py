"""`cptjax eval | report | generate | merge` arguments: thin parsing over the library.

What CPT did to a model: held-out numbers (eval_models.py), a run's report (report.py), text
(generate.py) and merges back toward the base (merge.py, merge_sweep.py).
"""

from __future__ import annotations

import argparse
import dataclasses

from cptjax.core.dtypes import FLOAT_NAMES
from cptjax.core.errors import CptjaxError

_MODEL_HELP = ("an HF folder or a cptjax checkpoint (or a run folder); PATH@STEP for one checkpoint step; "
               "PATH:ema or PATH@STEP:ema for the EMA of a run's weights (training.ema)")
_DATA_HELP = ("a held-out set NAME=SPEC: SPEC is TYPE:PATHS (code=text:'heldout/*.py', "
              "wiki=jsonl:heldout/wiki.jsonl) or a YAML mapping of the set's keys "
              "(code='{type: jsonl, paths: [h.jsonl], max_docs: 200}'); repeatable")


def _add_eval_data(parser, flag: str, dtype: bool = True) -> None:
    parser.add_argument(flag, dest="data", action="append", default=[], metavar="NAME=SPEC", help=_DATA_HELP)
    parser.add_argument("--data-config", metavar="FILE", help="a YAML file with an eval_sets list (a run's "
                        "config.yaml works: its seq_len and batch size become the defaults)")
    parser.add_argument("--domain", action="append", default=[], metavar="NAME",
                        help="a set that measures adaptation (repeatable; default: the first set); "
                        "the others measure forgetting")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default: the run's, else "
                        "min(2048, max_position_embeddings))")
    parser.add_argument("--batch-size", type=int, help="rows per batch (default: the run's, else 8)")
    if dtype:
        parser.add_argument("--dtype", default="float32", choices=FLOAT_NAMES,
                            help="parameters and compute (default float32)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the models' own)")


def add_measure_commands(commands) -> None:
    """Adds the four commands to the `cptjax` command's subparsers."""
    ev = commands.add_parser("eval", help="held-out loss, perplexity and bits/byte of models; the first "
                             "model is the reference for adaptation and forgetting")
    ev.add_argument("--model", action="append", default=[], required=True, help=_MODEL_HELP + "; repeatable")
    _add_eval_data(ev, "--data")
    ev.add_argument("--position-buckets", metavar="EDGES", help="loss by position in the document: bucket "
                    "edges such as 1024,4096 ('' for none; default: 8 doubling buckets up to --seq-len)")
    ev.add_argument("--retrieval", metavar="YAML", help="the pass-key probe, accuracy by length and depth: "
                    "'{lengths: [1024, 4096], depths: [0, 0.5, 1], samples: 4}' (lengths in tokens, at most "
                    "--seq-len)")
    ev.add_argument("--tasks", metavar="NAMES", help="lm-evaluation-harness tasks run on every model, "
                    "comma-separated names or local YAML files (hellaswag,arc_easy,my_task.yaml); needs the "
                    "eval extra")
    ev.add_argument("--limit", type=float, help="with --tasks: documents per task (below 1: a fraction)")
    ev.add_argument("--num-fewshot", type=int, help="with --tasks: few-shot examples (default: each task's own)")
    ev.add_argument("--out", help="new folder for eval.json and eval.md (default: print only)")

    rep = commands.add_parser("report", help="a training run's Markdown report with PNG plots")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="the run_dir of a cptjax train run")
    rep.add_argument("--out", help="new folder for the report (default: RUN_DIR/report-step<N>)")
    rep.add_argument("--domain", action="append", default=[], metavar="NAME",
                     help="an eval set that measures adaptation (repeatable; default: the first set)")

    mg = commands.add_parser("merge", help="interpolate a tuned model back toward its base; with --eval, "
                             "a sweep over alphas that picks the best within a forgetting tolerance")
    mg.add_argument("--base", required=True, help=_MODEL_HELP)
    mg.add_argument("--tuned", required=True, help=_MODEL_HELP)
    mg.add_argument("--alpha", required=True, help="the tuned model's weight in [0, 1] (0: the base); with "
                    "--eval, a comma-separated list such as 0,0.25,0.5,0.75,1")
    mg.add_argument("--out", required=True, help="new folder: the merged weights, or with --eval the sweep's "
                    "sweep.json, sweep.md and sweep.png")
    mg.add_argument("--method", default="linear", choices=["linear", "slerp"])
    mg.add_argument("--format", default="checkpoint", choices=["checkpoint", "hf"],
                    help="of the merged weights (default: a cptjax checkpoint)")
    mg.add_argument("--dtype", choices=FLOAT_NAMES, help="the merged weights' dtype (default: the models' "
                    "stored one); with --eval, the evaluation's (default float32)")
    mg.add_argument("--max-shard-size", default="5GB", help="with --format hf (default 5GB)")
    _add_eval_data(mg, "--eval", dtype=False)
    mg.add_argument("--max-forgetting", type=float, default=0.05, metavar="NATS",
                    help="the largest general-set loss rise over the base a sweep accepts (default 0.05 "
                    "nats/token)")

    gen = commands.add_parser("generate", help="sample text from a model (greedy by default)")
    gen.add_argument("--model", required=True, help=_MODEL_HELP)
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1: off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=FLOAT_NAMES)
    gen.add_argument("--tokenizer", help="tokenizer folder (default: the model's own)")
    for parser in (ev, rep, mg, gen):
        parser.set_defaults(measure=True)


def run_measure_command(args: argparse.Namespace) -> None:
    """Runs a command of `add_measure_commands` (they set `measure`)."""
    if args.command == "eval":
        _eval(args)
    elif args.command == "generate":
        _generate(args)
    elif args.command == "merge":
        _merge(args)
    elif args.command == "report":
        from cptjax.measure.report import write_report
        report = write_report(args.run_dir, args.out, tuple(args.domain))
        print(f"wrote {report.out}/report.md with {len(report.figures)} plots"
              + (", and added them to the run's W&B run" if report.wandb else ""))


def _eval_settings(args, flag: str, dtype: str):
    """The eval sets of `flag` and --data-config, and how to score them (flags win over the file)."""
    from cptjax.measure.eval_models import (
        DEFAULT_BATCH_SIZE,
        EvalSettings,
        eval_sets_from_file,
        parse_eval_spec,
        parse_position_buckets,
        parse_retrieval,
    )

    sets, defaults = [], {}
    if args.data_config:
        sets, defaults = eval_sets_from_file(args.data_config)
    sets += [parse_eval_spec(spec, flag) for spec in args.data]
    settings = EvalSettings(tuple(sets), tuple(args.domain), args.seq_len or defaults.get("seq_len"),
                            args.batch_size or defaults.get("batch_size", DEFAULT_BATCH_SIZE), dtype, args.tokenizer,
                            flag)
    if args.command != "eval":  # merge sweeps compare whole-set losses only
        return settings
    buckets, retrieval = args.position_buckets, args.retrieval
    tasks = None
    if args.tasks is not None:
        from cptjax.measure.eval_tasks import parse_tasks
        tasks = parse_tasks(args.tasks, args.limit, args.num_fewshot)
    elif args.limit is not None or args.num_fewshot is not None:
        raise CptjaxError("--limit / --num-fewshot: only with --tasks")
    return dataclasses.replace(
        settings, tasks=tasks, position_buckets=parse_position_buckets(buckets) if buckets is not None else
        defaults.get("position_buckets"),
        retrieval=parse_retrieval(retrieval) if retrieval is not None else defaults.get("retrieval"))


def _eval(args) -> None:
    from cptjax.core.atomic_dir import check_output_dir
    from cptjax.core.paths import user_path
    from cptjax.measure.eval_models import evaluate_models, write_report

    if args.out:
        check_output_dir(user_path(args.out, "--out"))  # before any work
    s = _eval_settings(args, "--data", args.dtype)
    report = evaluate_models(args.model, s.sets, domain=s.domain, seq_len=s.seq_len, batch_size=s.batch_size,
                             dtype=s.dtype, tokenizer=s.tokenizer, position_buckets=s.position_buckets,
                             retrieval=s.retrieval, tasks=s.tasks)
    print(report.markdown(), end="")
    if args.out:
        print(f"wrote {write_report(report, args.out)}/eval.json and eval.md")


def _generate(args) -> None:
    from cptjax.io.weights import parse_model_arg
    from cptjax.measure.generate import Generator, Sampling

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    path, step, ema = parse_model_arg(args.model)
    result = Generator(path, step, dtype=args.dtype, tokenizer=args.tokenizer, ema=ema).generate(args.prompt, sampling)
    print(result.prompt + result.text)
    how = "greedy" if sampling.temperature == 0 else (f"temperature {sampling.temperature}, top-p "
                                                      f"{sampling.top_p}, seed {sampling.seed}")
    end = "end of sequence" if result.ended else f"--max-new-tokens {sampling.max_new_tokens}"
    print(f"[{result.model}: {result.new_tokens} new tokens, {how}, stopped at {end}]")


def _merge(args) -> None:
    from cptjax.core.atomic_dir import check_output_dir
    from cptjax.measure.merge import parse_alphas

    alphas = parse_alphas(args.alpha)
    check_output_dir(args.out)
    if not args.data and not args.data_config:
        if len(alphas) != 1:
            raise CptjaxError(f"--alpha {args.alpha}: several alphas need --eval NAME=SPEC (a sweep); give "
                              "one alpha to write a merge")
        from cptjax.measure.merge import write_merge
        out = write_merge(args.base, args.tuned, alphas[0], args.out, method=args.method, fmt=args.format,
                          dtype=args.dtype, max_shard_size=args.max_shard_size)
        print(f"wrote the {args.method} merge at alpha {alphas[0]:g} ({args.format}) to {out}")
        return
    from cptjax.measure.merge_sweep import sweep
    numbers = sweep(args.base, args.tuned, alphas, _eval_settings(args, "--eval", args.dtype or "float32"),
                    args.out, method=args.method, max_forgetting=args.max_forgetting)
    best = numbers["best"]
    print(f"wrote {numbers['out']}/sweep.md, sweep.json and sweep.png; " + (
        f"best alpha {best['alpha']:g}: adaptation {best['adaptation']:+.4f}, forgetting "
        f"{best['forgetting']:+.4f} nats/token (tolerance {numbers['max_forgetting']:g})" if best else
        f"no alpha keeps forgetting within {numbers['max_forgetting']:g} nats/token"))
