"""`cptjax data ...` arguments: thin parsing over `prepare_corpus`."""

from __future__ import annotations

import argparse

from cptjax.data.config import SOURCE_TYPES, InputConfig


def add_data_commands(subparsers) -> None:
    """Adds `data prepare` to the `cptjax` command's subparsers."""
    data = subparsers.add_parser("data", help="prepare training data")
    actions = data.add_subparsers(dest="data_command", required=True)
    prepare = actions.add_parser(
        "prepare", help="tokenize a corpus once into ArrayRecord shards of token ids",
        description="Tokenizes every document with the model's tokenizer into --out (a new "
        "folder, written whole or not at all): ArrayRecord shards + manifest.json. Train from it "
        "with a source of type 'prepared'.")
    prepare.add_argument("--type", required=True, choices=[t for t in SOURCE_TYPES if t != "prepared"],
                         help="input format")
    prepare.add_argument("--paths", nargs="+", default=[], help="files or globs (quote globs)")
    prepare.add_argument("--text-field", default="text", help="JSON/Parquet/TFDS field (default text)")
    prepare.add_argument("--delimiter", help="for --type text: split files on this string")
    prepare.add_argument("--dataset", help="for --type tfds: the dataset name")
    prepare.add_argument("--split", default="train", help="for --type tfds (default train)")
    prepare.add_argument("--data-dir", help="for --type tfds: where it is prepared")
    prepare.add_argument("--tokenizer", required=True, help="HF tokenizer folder (the model's)")
    prepare.add_argument("--out", required=True, help="new folder (must not exist or be empty)")
    prepare.add_argument("--shards", type=int, default=1, help="ArrayRecord files (default 1)")
    prepare.add_argument("--workers", type=int, default=0,
                         help="tokenizer worker processes, at most one per core (default 0: in this process)")
    prepare.add_argument("--invalid-utf8", default="fail", choices=["fail", "skip"],
                         help="a document that is not UTF-8: stop (default) or skip and count it")


def run_data_command(args: argparse.Namespace) -> None:
    from cptjax.data.prepare import prepare_corpus

    if args.data_command == "prepare":
        source = InputConfig(name="input", type=args.type, paths=tuple(args.paths),
                             text_field=args.text_field, delimiter=args.delimiter,
                             dataset=args.dataset, split=args.split, data_dir=args.data_dir)
        manifest = prepare_corpus(source, args.tokenizer, args.out, num_shards=args.shards,
                                  num_workers=args.workers, invalid_utf8=args.invalid_utf8)
        skipped = ", ".join(f"{n} {why}" for why, n in manifest["skipped"].items() if n)
        print(f"wrote {args.out}: {manifest['num_docs']} documents, {manifest['num_tokens']} tokens "
              f"in {len(manifest['shards'])} shards" + (f" (skipped: {skipped})" if skipped else ""))
