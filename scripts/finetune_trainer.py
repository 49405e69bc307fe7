#!/usr/bin/env python
"""Fine-tune a saved model with the stock `transformers` Seq2SeqTrainer (no code of ours in the loop).

    python scripts/finetune_trainer.py --model outputs/transformer-tiny --output_dir outputs/tiny-finetuned \
        --train_file more.jsonl --validation_file dev.jsonl --max_steps 500

Without data files it fine-tunes on the built-in number-words task. This is the path for users who already
know `Seq2SeqTrainer`: our model is a regular `transformers` seq2seq LM, so `DataCollatorForSeq2Seq` builds
its decoder inputs (via `prepare_decoder_input_ids_from_labels`) and `predict_with_generate=True` evaluates
with beam search. Note the model computes its own label-smoothed loss (`config.label_smoothing`).
`--save_steps N` writes the Trainer's own checkpoints, and `--resume_from_checkpoint PATH|latest` continues one.
Each checkpoint gets our manifest once the Trainer has written it (sizes and sha256 of its files, written last), so
`latest` takes the newest complete one: a checkpoint torn by a kill or a full disk is skipped with a warning.
The fine-tuned model never goes into the --model folder; a new run wants an empty --output_dir (or
--overwrite_output_dir, which deletes an earlier run's checkpoints once the data has been read), and resuming the
run's last checkpoint trains nothing (its model becomes the final one if the final save did not complete).
"""

import os
import sys

# Run as `python scripts/x.py`, Python puts scripts/ first on sys.path, where evaluate.py would shadow the
# `evaluate` library that the metrics use: drop it (this file imports nothing from scripts/).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from modeling_seq2seq.training import stoppable

FINAL_STAGING_PREFIX = ".final-model-tmp-"  # the final model's staging folder inside --output_dir
FINAL_STATE_NAME = "finetune_final.json"  # the step the final model is from; written last by the final save


def build_datasets(tokenizer, args, max_position_embeddings: int):
    """Tokenized train/validation splits with `input_ids`, `attention_mask` and `labels`."""
    from modeling_seq2seq.data import load_parallel_data

    raw = load_parallel_data(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_file=args.train_file,
        validation_file=args.validation_file,
        source_lang=args.source_lang,
        target_lang=args.target_lang,
    )

    def tokenize(batch, max_length=None):
        return tokenizer(batch["source"], text_target=batch["target"], truncation=max_length is not None,
                         max_length=max_length)

    if "train" not in raw:
        raise ValueError(f"--dataset_name {args.dataset_name!r} has no 'train' split (its splits: {', '.join(raw) or 'none'}).")
    train = raw["train"]
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    train = train.map(tokenize, batched=True, remove_columns=train.column_names)
    # As scripts/train.py: a pair over the limits is left out, not cut (a cut target, still ending in </s>, would
    # teach the model to stop mid-sentence).
    fits = [len(source) <= args.max_source_length and len(target) <= args.max_target_length
            for source, target in zip(train["input_ids"], train["labels"])]
    if not all(fits):
        print(f"Left out {fits.count(False)} training pairs longer than {args.max_source_length}/"
              f"{args.max_target_length} tokens (--max_source_length/--max_target_length).", file=sys.stderr)
        train = train.select([index for index, fit in enumerate(fits) if fit])
    if len(train) == 0:
        raise ValueError("No training pairs left after length filtering: raise --max_source_length/--max_target_length.")
    validation = None
    if "validation" in raw:
        validation = raw["validation"]
        if args.max_eval_samples:
            validation = validation.select(range(min(args.max_eval_samples, len(validation))))
        # Whole references for the scores; only what the model cannot take at all is cut.
        validation = validation.map(tokenize, batched=True, remove_columns=validation.column_names,
                                    fn_kwargs={"max_length": max_position_embeddings})
    return train, validation


def finetune(args):
    """Run Seq2SeqTrainer; returns (trainer, final evaluation metrics or {})."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from modeling_seq2seq import checkpointing as ckpt
    from modeling_seq2seq.training import bleu_tokenizer, load_model_and_tokenizer, translation_metrics

    # A verified folder; with "latest", None (a warning said why) when there is no complete checkpoint: from scratch.
    resume = ckpt.resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    check_output_dir(args, resume)
    # Left by a killed final save, or by an earlier run's checkpoints being deleted (--overwrite_output_dir).
    for stale in filter(left_by_a_killed_save, Path(args.output_dir).glob(".*")):
        shutil.rmtree(stale, ignore_errors=True)
    step = None if resume is None else checkpoint_step(resume)
    if step is not None and step >= args.max_steps:
        finish_from_last_checkpoint(args, resume, step)
        return None, {}
    model, tokenizer = load_model_and_tokenizer(args.model, device="cpu" if args.use_cpu else None)
    model.train()
    train_set, validation_set = build_datasets(tokenizer, args, model.config.max_position_embeddings)
    if resume is None and args.overwrite_output_dir:
        replace_earlier_checkpoints(args.output_dir)
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)

    def compute_metrics(eval_prediction):
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        predictions = np.where(predictions < 0, tokenizer.pad_token_id, predictions)
        labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
        decoded = [text.strip() for text in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        references = [text.strip() for text in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        scores = translation_metrics(decoded, references, effective_order=args.train_file is None and args.dataset_name is None,
                                     tokenize=bleu_tokenizer(args.target_lang))
        return {"bleu": scores["bleu"], "chrf": scores["chrf"], "exact_match": scores["exact_match"]}

    has_eval = validation_set is not None
    training_args = Seq2SeqTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="inverse_sqrt",
        adam_beta1=0.9,
        adam_beta2=0.98,
        adam_epsilon=1e-9,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=args.eval_steps,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or None,
        predict_with_generate=True,
        generation_num_beams=args.num_beams,
        generation_max_length=min(args.max_target_length + 50, model.config.max_position_embeddings),
        report_to="none",
        seed=args.seed,
        use_cpu=args.use_cpu,
        disable_tqdm=args.quiet,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=validation_set,
        data_collator=collator,
        processing_class=tokenizer,  # transformers 5.x raises on tokenizer=
        compute_metrics=compute_metrics if has_eval else None,
        callbacks=[manifest_on_save_callback()],
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    metrics = trainer.evaluate() if has_eval else {}
    model.config.use_cache = True  # the Trainer switches the cache off while training
    save_final_model(trainer.save_model, trainer.is_world_process_zero(), trainer.state.global_step, tokenizer,
                     args.output_dir)
    return trainer, metrics


def replace_earlier_checkpoints(output_dir) -> None:
    """--overwrite_output_dir, once the data has been read: an earlier run's checkpoints go (each renamed aside first,
    so a kill leaves none half-deleted), or `latest` would later resume them, or take one as this run's last."""
    from accelerate import PartialState

    from modeling_seq2seq import checkpointing as ckpt

    earlier = [path for _, path in ckpt.list_checkpoints(output_dir)]
    if PartialState().is_main_process and earlier:
        Path(output_dir, FINAL_STATE_NAME).unlink(missing_ok=True)
        for path in ckpt.set_aside(earlier):
            shutil.rmtree(path, ignore_errors=True)
        print(f"Deleted {len(earlier)} checkpoints of an earlier run in {output_dir} (--overwrite_output_dir).")
    PartialState().wait_for_everyone()


# What the final save writes into --output_dir besides weights and code (the Trainer's and the tokenizer's files).
SAVED_FILE_NAMES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "training_args.bin", "trainer_state.json", "all_results.json",
                    "train_results.json", "eval_results.json", FINAL_STATE_NAME}


def check_output_dir(args, resume) -> None:
    """The final save writes a whole model into --output_dir: never into the --model folder it starts from, nor, for a
    new run, over a saved model or a user's files (resuming continues the run whose checkpoints are there)."""
    from modeling_seq2seq import checkpointing as ckpt

    output_dir, model_dir = Path(args.output_dir), Path(args.model)
    if output_dir.resolve() == model_dir.resolve():
        raise ValueError(f"--output_dir {args.output_dir!r} is the --model folder: the fine-tuned model would overwrite "
                         "the one it starts from. Choose another --output_dir.")
    if model_dir.resolve().is_relative_to(output_dir.resolve()) and any(
            part.startswith("checkpoint-") for part in model_dir.resolve().relative_to(output_dir.resolve()).parts):
        raise ValueError(f"--model {args.model!r} is a checkpoint folder inside --output_dir {args.output_dir!r}: this "
                         "run's checkpoints would overwrite or rotate it away. Copy it elsewhere first, or choose "
                         "another --output_dir.")
    for option in ("train_file", "validation_file"):  # a data file named like one the final save writes there
        data = Path(getattr(args, option) or "")
        if getattr(args, option) and data.resolve().parent == output_dir.resolve() and (
                data.name in SAVED_FILE_NAMES or data.suffix in (".safetensors", ".py")):
            raise ValueError(f"--{option} {str(data)!r} lies in --output_dir under a name the fine-tuned model's save "
                             "writes: it would be overwritten. Move it, or choose another --output_dir.")
    if resume is not None or args.overwrite_output_dir or not output_dir.is_dir():
        return
    held = sorted(entry.name for entry in output_dir.iterdir() if not left_by_a_killed_save(entry))
    if held:
        raise ValueError(f"--output_dir {args.output_dir!r} is not empty ({', '.join(held[:6])}"
                         f"{', ...' if len(held) > 6 else ''}): the fine-tuned model would overwrite a saved model or "
                         "your files there. Choose another (or a new) --output_dir, pass --resume_from_checkpoint to "
                         "continue a run there, or --overwrite_output_dir to write over them.")


def left_by_a_killed_save(entry: Path) -> bool:
    """The final model's staging folder, or an earlier run's checkpoint set aside for deletion (names only we give)."""
    from modeling_seq2seq import checkpointing as ckpt

    return ckpt.is_mkdtemp_folder(entry, FINAL_STAGING_PREFIX) or (
        entry.name.startswith(ckpt.REPLACED_PREFIX) and ckpt.is_stale_staging(entry))


def checkpoint_step(resume) -> int:
    """The step of a Seq2SeqTrainer checkpoint (its trainer_state.json's `global_step`)."""
    from modeling_seq2seq import checkpointing as ckpt

    file = Path(resume) / ckpt.TRAINER_STATE_NAME
    state = ckpt.read_json_object(file, "a Trainer state")
    if type(state.get("global_step")) is not int:
        raise ValueError(f"{file} has no whole-number 'global_step': not a Seq2SeqTrainer checkpoint (one of "
                         "scripts/train.py resumes with that script).")
    return state["global_step"]


def finish_from_last_checkpoint(args, resume, step) -> None:
    """Resuming the run's last checkpoint: the stock Trainer would train one step past --max_steps (and again at each
    such resume). Nothing is trained; the checkpoint's model becomes the final one unless the final save of that
    step completed (its FINAL_STATE_NAME, written last, says so)."""
    from accelerate import PartialState

    from modeling_seq2seq import checkpointing as ckpt
    from modeling_seq2seq.training import load_model_and_tokenizer, load_saved_model

    marker = Path(args.output_dir) / FINAL_STATE_NAME
    if marker.is_file() and ckpt.read_json_object(marker, "the final model's step").get("global_step") == step:
        print(f"{resume} is the run's last step ({step} of --max_steps {args.max_steps}) and the fine-tuned model is "
              f"saved in {args.output_dir}: nothing to resume.")
        return
    if PartialState().is_main_process:
        _, tokenizer = load_model_and_tokenizer(args.model, device="cpu")
        model = load_saved_model(resume)
        model.config.use_cache = True
        save_final_model(model.save_pretrained, True, step, tokenizer, args.output_dir)
        print(f"{resume} is the run's last step ({step} of --max_steps {args.max_steps}), but its final save did not "
              f"complete: saved its model as the fine-tuned one in {args.output_dir}, training nothing.")
    PartialState().wait_for_everyone()


def manifest_on_save_callback():
    """A `TrainerCallback` that writes our manifest into each checkpoint the Trainer has just saved (main process)."""
    from transformers import TrainerCallback

    from modeling_seq2seq import checkpointing as ckpt

    class ManifestOnSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt.write_manifest(ckpt.checkpoint_path(args.output_dir, state.global_step), state.global_step)

    return ManifestOnSave()


def save_final_model(save_model, is_main: bool, step: int, tokenizer, output_dir) -> None:
    """`save_model` (the Trainer's, or a model's `save_pretrained`) and the portable tokenizer_config.json (see
    STACK.md), written into a staging folder inside `output_dir` and then moved in file by file, the configs last and
    FINAL_STATE_NAME (the model's step) after them, the earlier one removed first: a kill or a full disk leaves each
    file of an earlier final model whole or replaced, never torn, and no step that the files might not be from. (The
    Trainer's own checkpoints are its own writes.)"""

    from modeling_seq2seq.checkpointing import move_files_into
    from modeling_seq2seq.tokenization import save_tokenizer

    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=FINAL_STAGING_PREFIX, dir=output_dir)
    try:
        save_model(staging)  # every process calls the Trainer's (sharded models gather); the main one writes
        if is_main:
            save_tokenizer(tokenizer, staging)
            Path(staging, FINAL_STATE_NAME).write_text(json.dumps({"global_step": step}) + "\n", encoding="utf-8")
            Path(output_dir, FINAL_STATE_NAME).unlink(missing_ok=True)
            move_files_into(staging, output_dir, last=("tokenizer_config.json", "config.json", FINAL_STATE_NAME))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved model folder to start from")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train_file", help="training pairs (.jsonl/.json/.csv/.tsv, or the prefix P of line-aligned P.<source_lang> and P.<target_lang>); default: the built-in task")
    parser.add_argument("--validation_file")
    parser.add_argument("--dataset_name", help="a datasets dataset: a Hub name, a local data folder, or a DatasetDict saved "
                        "with save_to_disk (translation dict column or one column per language)")
    parser.add_argument("--dataset_config_name", help="the dataset's configuration (e.g. de-en)")
    parser.add_argument("--source_lang", default="en")
    parser.add_argument("--target_lang", default="de")
    parser.add_argument("--max_source_length", type=int, default=128, help="longer training pairs are left out")
    parser.add_argument("--max_target_length", type=int, default=128, help="longer training pairs are left out")
    parser.add_argument("--max_train_samples", type=int, default=None, help="the first N training pairs (0: all)")
    parser.add_argument("--max_eval_samples", type=int, default=200, help="the first N validation pairs (0: all)")
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--warmup_steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=64, help="sentences per device and step")
    parser.add_argument("--eval_steps", type=int, default=100)
    parser.add_argument("--save_steps", type=int, default=0, help="write a Trainer checkpoint every N steps (0: none)")
    parser.add_argument("--resume_from_checkpoint", default=None,
                        help="a Trainer checkpoint folder to continue from, or 'latest' (the newest in --output_dir)")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="start a new run in a non-empty --output_dir, writing over what is there")
    parser.add_argument("--logging_steps", type=int, default=20)
    parser.add_argument("--num_beams", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--use_cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


@stoppable(outputs="--resume_from_checkpoint latest continues from the last complete checkpoint (one left part-written "
                   "has no manifest and is skipped) and completes a final model stopped while being moved in")
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.save_steps < 0:
        parser.error("--save_steps must be 0 (no checkpoints) or more")
    for option in ("max_steps", "batch_size", "eval_steps", "logging_steps", "num_beams"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1, got {getattr(args, option)}")
    for option in ("max_train_samples", "max_eval_samples"):
        if getattr(args, option) is not None and getattr(args, option) < 0:
            parser.error(f"--{option} must be 0 (all) or more, got {getattr(args, option)}")
    for option in ("max_source_length", "max_target_length"):
        if getattr(args, option) < 2:
            parser.error(f"--{option} must be at least 2 (a token and </s>), got {getattr(args, option)}")
    if args.warmup_steps < 0 or not 0 < args.learning_rate < float("inf"):
        parser.error("--warmup_steps must be 0 or more and --learning_rate a finite number above 0")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output_dir {args.output_dir} is a file, not a folder")
    if args.dataset_name and (args.train_file or args.validation_file):
        parser.error("give --dataset_name or --train_file/--validation_file, not both")
    if args.dataset_config_name and not args.dataset_name:
        parser.error("--dataset_config_name needs --dataset_name")
    if args.validation_file and not args.train_file:
        parser.error("--validation_file needs --train_file (the built-in task brings its own validation split)")
    from modeling_seq2seq.checkpointing import CheckpointError

    try:
        trainer, metrics = finetune(args)
    except (OSError, ValueError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if metrics:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    if trainer is not None:
        print(f"Saved the fine-tuned model to {args.output_dir}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
