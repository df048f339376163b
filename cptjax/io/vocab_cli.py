"""The arguments of `cptjax vocab`: growing a model's vocabulary, its tokenizer first (`extend`:
cptjax.data.vocab_extend), then its embedding and head rows (`resize`: cptjax.io.resize)."""

from __future__ import annotations


def add_vocab_commands(commands) -> None:
    """Adds the `vocab` group and its commands to the `cptjax` subparsers."""
    vocab = commands.add_parser("vocab", help="grow a model's vocabulary: new tokens, new embedding and head rows")
    actions = vocab.add_subparsers(dest="vocab_command", required=True)
    extend = actions.add_parser(
        "extend", help="add the domain's most useful tokens to an HF BPE tokenizer; text without them "
        "keeps its ids",
        description="Continues the base tokenizer's BPE on the domain corpus and adds the N merges that save "
        "the most tokens there, with ids after every existing id. A text in which no pre-token contains a new "
        "token's string encodes to exactly the base's ids. Writes --out (a new folder): the tokenizer files "
        "and vocab_extension.json (new ids, strings, base pieces, bytes per token before and after).")
    extend.add_argument("--tokenizer", required=True, help="the base HF tokenizer folder (with tokenizer.json)")
    extend.add_argument("--corpus", nargs="+", required=True, metavar="PATH",
                        help="domain files or globs (quote globs): .jsonl (.gz, .zst), .parquet, else one "
                        "document per file")
    extend.add_argument("--new-tokens", type=int, required=True, metavar="N", help="how many tokens to add")
    extend.add_argument("--out", required=True, help="new folder (must not exist or be empty)")
    extend.add_argument("--general", nargs="+", default=[], metavar="PATH",
                        help="general text to measure bytes per token on, before and after")
    extend.add_argument("--text-field", default="text", help="JSON/Parquet field (default text)")
    resize = actions.add_parser("resize", help="a model with embedding and head rows for an extended "
                                "tokenizer's new ids (old rows unchanged)")
    resize.add_argument("--model", required=True, help="HF folder or cptjax checkpoint (PATH[@STEP][:ema]), "
                        "with its own tokenizer files")
    resize.add_argument("--tokenizer", required=True, help="the extended tokenizer's folder (tokenizer.json): "
                        "every id of the model's tokenizer, then the new ones")
    resize.add_argument("--init", default="mean", choices=("mean", "covariance", "pieces"),
                        help="new rows: the old rows' mean; a sample with their mean and covariance "
                        "(transformers' mean_resizing); the mean of the rows of the old pieces the token "
                        "splits into (default: mean)")
    resize.add_argument("--out", required=True, help="new folder (must not exist or be empty)")
    resize.add_argument("--pad-to", type=int, default=128, help="rows padded to a multiple of this, never "
                        "predicted (default 128; 1: none); an HF folder is never padded")
    resize.add_argument("--format", default="orbax", choices=("orbax", "hf"),
                        help="a cptjax checkpoint (default) or an HF folder")
    resize.add_argument("--seed", type=int, default=0, help="the covariance init's sample")


def run_vocab_command(args) -> None:
    if args.vocab_command == "extend":
        from cptjax.data.vocab_extend import extend_vocabulary, summary

        report = extend_vocabulary(args.tokenizer, args.corpus, args.new_tokens, args.out, general=args.general,
                                   text_field=args.text_field)
        print(summary(report, args.out))
    elif args.vocab_command == "resize":
        from cptjax.io.resize import resize_vocab

        result = resize_vocab(args.model, args.tokenizer, args.out, init=args.init, pad_to=args.pad_to,
                              fmt=args.format, seed=args.seed)
        kind = "HF model" if args.format == "hf" else "cptjax checkpoint"
        padding = f", {result.rows} rows (padding never predicted)" if result.rows > result.new_tokens else ""
        print(f"wrote {kind} {result.out}: vocabulary {result.old_tokens} -> {result.new_tokens} ids{padding}, "
              f"new rows by {args.init}")
        for note in result.notes:
            print(f"note: {note}")
        print(f"train it with optimizer.vocab.original_rows: {result.old_tokens} (docs/training.md, "
              "'A grown vocabulary')")
