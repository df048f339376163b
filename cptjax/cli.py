"""The `cptjax` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cptjax.core.errors import CptjaxError


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line, like every other cptjax error (argparse prints the usage too)."""

    def error(self, message: str):
        self.exit(2, f"cptjax: error: {self.prog.removeprefix('cptjax ')}: {message}; see "
                     f"{self.prog} --help\n")


def _parser() -> argparse.ArgumentParser:
    from cptjax.core.dtypes import FLOAT_NAMES  # here, not at import: `cptjax train` installs its SIGTERM
                                           # handler before anything slow is imported
    parser = _Parser(prog="cptjax", description="Continued pretraining of "
                                     "Llama-family models in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the whole CPT job on its embedded default (tiny model, CPU)")
    demo.add_argument("--workdir", help="folder for the demo's files (default: a new temporary folder)")
    demo.add_argument("--data-dir", help="the repository's data/ folder (found automatically in a clone)")
    demo.add_argument("--base-steps", type=int, default=200, help="steps of base pretraining")
    demo.add_argument("--cpt-steps", type=int, default=100, help="steps of continued pretraining")

    train = commands.add_parser("train", help="continue pretraining a model (resumes its own run)")
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set training.steps=100 (repeatable)")
    train.add_argument("--until-step", type=int, metavar="N",
                       help="stop after step N with a checkpoint (a time-limited job); the same "
                       "command without it continues the run")
    plan = commands.add_parser("plan", help="compile a config's train step for its hardware (a TPU "
                               "slice from any host, or this machine) and say whether it fits")
    plan.add_argument("--config", required=True, help="YAML config (see configs/)")
    plan.add_argument("--topology", help="a TPU slice, e.g. v5p-128, v5e-256, v6e-64 (needs the tpu "
                      "extra); default: this machine's devices")
    plan.add_argument("--hf-config", help="the model's config.json, when model.init_from is not on "
                      "this machine (no weights are read either way)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the fully resolved config")
    show.add_argument("--config", required=True)
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    config_commands.add_parser("reference", help="every config key: type, default, what it does (Markdown)")

    convert = commands.add_parser("convert", help="convert weights between HF and cptjax")
    directions = convert.add_subparsers(dest="direction", required=True)
    to_orbax = directions.add_parser("hf-to-orbax", help="HF safetensors folder -> cptjax checkpoint")
    to_orbax.add_argument("--hf-dir", required=True, help="folder with config.json and *.safetensors")
    to_orbax.add_argument("--out", required=True, help="new checkpoint folder (must not exist or be empty)")
    to_hf = directions.add_parser("orbax-to-hf", help="cptjax checkpoint -> HF safetensors folder")
    to_hf.add_argument("--ckpt", required=True, help="checkpoint folder")
    to_hf.add_argument("--out", required=True, help="new HF folder (must not exist or be empty)")
    to_hf.add_argument("--step", type=int, help="checkpoint step (default: the latest finished one)")
    to_hf.add_argument("--dtype", choices=FLOAT_NAMES,
                       help="the export's precision (default: the one the source model's config.json "
                       "recorded, float32 where none)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    to_hf.add_argument("--ema", action="store_true",
                       help="export the EMA of the weights that a training run with training.ema saved")
    to_hf.add_argument("--verify", action="store_true",
                       help="load the export with transformers (needs torch) and report the logit difference")
    from cptjax.data.cli import add_data_commands
    add_data_commands(commands)
    from cptjax.measure.cli import add_measure_commands
    add_measure_commands(commands)
    from cptjax.io.vocab_cli import add_vocab_commands
    add_vocab_commands(commands)
    commands.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness's own command line with the "
                        "cptjax model registered: cptjax lm-eval --model cptjax --model_args path=DIR[@STEP] "
                        "--tasks hellaswag (needs the eval extra)")
    return parser


def _run(args) -> int | None:
    if args.command == "demo":
        from cptjax.demo import run_demo
        run_demo(args.workdir, data_dir=args.data_dir, base_steps=args.base_steps, cpt_steps=args.cpt_steps)
    elif args.command == "train":
        from cptjax.train.config import load_config
        from cptjax.train.goodput import process_start_time
        from cptjax.train.trainer import run
        config = load_config(args.config, args.overrides)
        if args.until_step is not None and args.until_step < 1:
            raise CptjaxError(f"--until-step {args.until_step}: must be >= 1")
        result = run(config, until_step=args.until_step, started=process_start_time())
        if result.failed:
            raise CptjaxError(result.stopped_early)
        print(f"cptjax train: {'finished' if result.stopped_early is None else 'stopped'} at step "
              f"{result.final_step}")
    elif args.command == "config" and args.config_command == "reference":
        from cptjax.train.config_reference import reference_markdown
        print(reference_markdown(), end="")
    elif args.command == "plan":
        if args.topology:  # compile-only TPU devices; this host's own backend stays the CPU
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from cptjax.train.config import load_config
        from cptjax.train.plan import format_plan, model_config_for, plan
        config = load_config(args.config, args.overrides)
        model_config = model_config_for(config, args.hf_config)
        result = plan(config, model_config, args.topology)
        print(format_plan(result, args.config, model_config, config))
        return 0 if result.fits else 1
    elif args.command == "config":
        from cptjax.train.config import dump_yaml, load_config
        print(dump_yaml(load_config(args.config, args.overrides)), end="")
    elif args.command == "data":
        from cptjax.data.cli import run_data_command
        run_data_command(args)
    elif args.command == "vocab":
        from cptjax.io.vocab_cli import run_vocab_command
        run_vocab_command(args)
    elif getattr(args, "measure", False):  # eval, report, generate, merge
        from cptjax.measure.cli import run_measure_command
        run_measure_command(args)
    elif args.direction == "hf-to-orbax":
        from cptjax.convert import hf_to_orbax
        out = hf_to_orbax(args.hf_dir, args.out)
        print(f"wrote cptjax checkpoint {out}")
    else:
        from cptjax.convert import orbax_to_hf
        result = orbax_to_hf(args.ckpt, args.out, step=args.step, dtype=args.dtype,
                             max_shard_size=args.max_shard_size, verify=args.verify, ema=args.ema)
        print(f"wrote HF model {result.out} from step {result.step}: {', '.join(result.files)}")
        if result.max_logit_diff is not None:
            print(f"verified with transformers: max |logit difference| = {result.max_logit_diff:.3g}")


# Libraries whose warnings are about their own housekeeping (Orbax logs through absl: read-only
# managers, save intervals; gcsfs: bucket types); their errors still show.
_QUIET_LOGGERS = ("absl", "gcsfs")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if argv[:1] == ["train"]:
        from cptjax.train.preemption import install_handler
        install_handler()  # a SIGTERM during start-up (imports, compiling) exits cleanly too
    try:
        if argv[:1] == ["lm-eval"]:  # every argument is lm-eval's, parsed by lm-eval
            from cptjax.train.lm_eval_model import lm_eval_main
            lm_eval_main(argv[1:])
            return 0
        args = _parser().parse_args(argv)
        return _run(args) or 0  # `plan` returns 1 when the step does not fit
    except CptjaxError as err:
        print(f"cptjax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
