"""The arguments of `cptjax vocab`: growing a model's vocabulary (`resize`; `extend` builds the tokenizer)."""

from __future__ import annotations


def add_vocab_commands(commands) -> None:
    """Adds the `vocab` group and its commands to the `cptjax` subparsers."""
    vocab = commands.add_parser("vocab", help="grow a model's vocabulary: new tokens, new embedding and head rows")
    actions = vocab.add_subparsers(dest="vocab_command", required=True)
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
    if args.vocab_command == "resize":
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
