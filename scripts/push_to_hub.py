#!/usr/bin/env python
"""Publish a trained model on the Hugging Face Hub, loadable with plain `transformers` (trust_remote_code=True).

    python scripts/push_to_hub.py --model_dir out --repo_id USER/NAME [--private] [--commit_message MSG]
    python scripts/push_to_hub.py --model_dir out --repo_id USER/NAME --dry_run hub-folder   # no network

The repository folder (weights in safetensors, config with `auto_map` and `custom_pipelines`, generation config,
tokenizer, the model and pipeline code, README.md rendered from `model_card.md`) is assembled first; `--dry_run OUT`
writes it to OUT, prints its file list and stops. Otherwise it is built in a temporary folder and uploaded with
`huggingface_hub` (`create_repo` + `upload_folder`) as the repository's whole content: files of an earlier upload
that the folder lacks are deleted in the same commit (they stay in the history). Errors are reported on one line,
with exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from modeling_seq2seq.training import stoppable

REPO_TEMPLATE = Path(__file__).resolve().parents[1] / "model_card.md"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="folder saved by training (save_pretrained)")
    parser.add_argument("--repo_id", required=True, help="the Hub repository, USER/NAME or ORG/NAME")
    parser.add_argument("--private", action="store_true",
                        help="create the repository as private (an existing public one is refused, not changed); without it, a new "
                        "repository gets its owner's default visibility")
    parser.add_argument(
        "--dry_run", metavar="OUT", help="write the repository folder to OUT and print its files; no upload"
    )
    parser.add_argument("--overwrite", action="store_true", help="with --dry_run: replace OUT if it holds an earlier Hub folder of this script")
    parser.add_argument("--commit_message", default="Upload Seq2SeqTransformer model")
    parser.add_argument("--license", default="apache-2.0", help="license id for the card metadata")
    parser.add_argument("--tags", nargs="*", default=[], help="extra tags for the card metadata")
    parser.add_argument(
        "--datasets", nargs="*", default=None,
        help="Hub dataset ids for the card metadata (default: from eval_results.json)",
    )
    parser.add_argument("--template", default=None, help="model card template (default: the repo's model_card.md)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` one)")
    args = parser.parse_args(argv)
    repo = args.repo_id.split("/")
    if len(repo) != 2 or not all(repo):
        parser.error(f"--repo_id must look like USER/NAME, got {args.repo_id!r}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        parser.error(f"--repo_id {args.repo_id!r}: not a Hub repository name ({error})")
    # The card's metadata as the Hub reads it: a license id, dataset ids (never a local path), tags.
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", args.license):
        parser.error(f"--license must be a license id such as apache-2.0, mit or other, got {args.license!r}")
    from modeling_seq2seq.hub import names_a_data_file

    for dataset in args.datasets or []:
        try:
            validate_repo_id(dataset)
            if names_a_data_file(dataset) or Path(dataset).is_file():  # data/train.jsonl passes the above
                raise HFValidationError(dataset)
        except HFValidationError:
            parser.error(f"--datasets: {dataset!r} is not a Hub dataset id (USER/NAME or NAME); local data is not "
                         "listed in the card's metadata")
    if any(not tag.strip() for tag in args.tags):
        parser.error("--tags: a tag is empty")
    return args


@stoppable
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from modeling_seq2seq.hub import (
        HubUploadError,
        UnsafeRemoteCodeError,
        build_hub_folder,
        check_can_upload,
        push_folder,
    )

    template = args.template
    if template is None and REPO_TEMPLATE.is_file():  # the checkout this script belongs to
        template = REPO_TEMPLATE
    build = dict(
        repo_id=args.repo_id,
        license=args.license,
        tags=args.tags,
        datasets=args.datasets,
        template=template,
    )
    try:
        if args.dry_run:
            names = build_hub_folder(args.model_dir, args.dry_run, overwrite=args.overwrite, **build)
            print(f"Wrote the repository folder for {args.repo_id} to {Path(args.dry_run).resolve()} (not uploaded):")
            for name in names:
                size = (Path(args.dry_run) / name).stat().st_size
                print(f"  {name}  ({size:,} bytes)")
            return 0
        token = check_can_upload(args.token)  # before the build: offline or without a token, say so at once
        with tempfile.TemporaryDirectory(prefix="push-to-hub-") as tmp:
            folder = Path(tmp) / "repo"
            names = build_hub_folder(args.model_dir, folder, **build)
            print(f"Uploading {len(names)} files to {args.repo_id}: {', '.join(names)}")
            url = push_folder(
                folder, args.repo_id, private=args.private or None, commit_message=args.commit_message, token=token
            )
        print(f"Uploaded: {url}")
        return 0
    except (HubUploadError, UnsafeRemoteCodeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
