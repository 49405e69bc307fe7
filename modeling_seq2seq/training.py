"""Training with Accelerate and the paper's recipe: schedule, token batches, checkpoints, resume, evaluation.

`main(argv)` is what `scripts/train.py` runs (also under `accelerate launch`). Settings come from a YAML recipe
(`--config configs/train-tiny.yaml`) and command-line flags override them. `train(config)` does the work:

1. data (the built-in number-words task unless a dataset or files are given) and the shared BPE tokenizer
   (trained on the training text unless `--tokenizer` is given);
2. the model from a preset JSON (`--model_config`), Adam(0.9, 0.98, 1e-9) and the inverse-square-root warmup
   schedule of Section 5.3, batches of about `max_tokens` tokens with gradient accumulation;
3. periodic validation (loss, BLEU, chrF), atomic checkpoints, resume, a wall-clock budget, NaN/inf guards;
4. the final model, tokenizer and generation config saved with `save_pretrained`, test-set metrics in
   `eval_results.json`, a JSONL log and a loss/BLEU curve picture.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpointing as ckpt

logger = logging.getLogger("modeling_seq2seq.training")

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_FILE_NAME = "training_log.jsonl"
EVAL_RESULTS_NAME = "eval_results.json"
# The settings eval_results.json records (as "training_config"), for the model card: the recipe, not local paths.
RECIPE_FIELDS = ("max_steps", "max_time_minutes", "max_tokens", "gradient_accumulation_steps", "lr_scale", "warmup_steps",
                 "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "label_smoothing", "max_grad_norm",
                 "mixed_precision", "max_source_length", "max_target_length", "max_train_samples", "average_checkpoints",
                 "seed")
CURVES_FILE_NAME = "training_curves.png"
TOKENIZER_DIR_NAME = "tokenizer"
TOKENIZER_STAGING_NAME = ckpt.TMP_PREFIX + TOKENIZER_DIR_NAME
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
TRAINER_STATE_VERSION = 1


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


def _option(default, help_text, choices=None):
    metadata = {"help": help_text}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainingConfig:
    """Every setting of a training run; YAML keys and command-line flags have these names.

    Defaults are the paper's base recipe (Section 5); `configs/train-tiny.yaml` scales it down.
    """

    # where things go
    output_dir: str = _option("outputs/transformer", "folder for checkpoints, logs and the final model")
    # model and tokenizer
    model_config: str = _option("configs/transformer-base.json", "model preset JSON (a Seq2SeqTransformerConfig)")
    model_overrides: dict = _option({}, "config fields that replace the preset's (a mapping in the YAML file, a JSON object as a flag)")
    tokenizer: typing.Optional[str] = _option(None, "a saved tokenizer; without it a shared BPE is trained on the training text")
    vocab_size: int = _option(37000, "vocabulary size of the BPE trained when --tokenizer is not given")
    # data
    dataset_name: typing.Optional[str] = _option(None, "a Hub dataset (e.g. wmt14); none and no files: the built-in task")
    dataset_config_name: typing.Optional[str] = _option(None, "the Hub dataset's configuration (e.g. de-en)")
    train_file: typing.Optional[str] = _option(None, "local training file (.jsonl/.json/.csv/.tsv), or the prefix P of line-aligned P.<source_lang> and P.<target_lang>")
    validation_file: typing.Optional[str] = _option(None, "local validation file")
    test_file: typing.Optional[str] = _option(None, "local test file")
    source_lang: str = _option("en", "source language key/column")
    target_lang: str = _option("de", "target language key/column")
    max_source_length: int = _option(256, "longer source sentences (in tokens) are dropped from training, and cut to "
                                          "it (with a warning) when validating and testing")
    max_target_length: int = _option(256, "longer target sentences (in tokens) are dropped from training")
    max_train_samples: typing.Optional[int] = _option(None, "use only the first N training pairs")
    # optimisation (Section 5.3)
    seed: int = _option(42, "seed of initialisation, data order and dropout")
    max_steps: int = _option(100000, "number of optimizer updates (the paper: 100k base, 300k big)")
    max_tokens: int = _option(4096, "tokens (source or target, padding included) per micro-batch and process")
    gradient_accumulation_steps: int = _option(1, "micro-batches per optimizer update and process")
    lr_scale: float = _option(1.0, "multiplier of d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)")
    warmup_steps: int = _option(4000, "linear warmup steps of the learning rate")
    adam_beta1: float = _option(0.9, "Adam beta1")
    adam_beta2: float = _option(0.98, "Adam beta2")
    adam_epsilon: float = _option(1e-9, "Adam epsilon")
    weight_decay: float = _option(0.0, "decoupled weight decay (AdamW); the paper uses none")
    max_grad_norm: typing.Optional[float] = _option(None, "clip gradients to this norm (none/0: no clipping)")
    label_smoothing: float = _option(0.1, "epsilon_ls of the training loss (Section 5.4)")
    mixed_precision: typing.Optional[str] = _option(None, "no | bf16 | fp16 (through Accelerate); unset: the `accelerate "
                                                    "launch` config's, else no", choices=("no", "bf16", "fp16"))
    compile: bool = _option(False, "torch.compile the training step's forward and backward (GPU: fuses the element-wise "
                                   "work around the matrix products; the first steps compile, for minutes)")
    max_consecutive_bad_steps: int = _option(10, "stop after this many consecutive NaN/inf steps")
    max_time_minutes: typing.Optional[float] = _option(None, "wall-clock budget of this process (a resumed run has it "
                                                              "anew); then stop cleanly, save, evaluate")
    torch_threads: typing.Optional[int] = _option(None, "CPU threads per process for torch (none: torch's default)")
    keep_freed_memory: bool = _option(True, "glibc keeps freed memory for reuse: faster CPU steps, higher RSS")
    # logging, evaluation, checkpoints
    logging_steps: int = _option(50, "log training loss, lr and tokens/s every N steps")
    report_to: str = _option("auto", "Accelerate trackers: auto (tensorboard when installed) | none | tensorboard",
                             choices=("auto", "none", "tensorboard"))
    eval_steps: int = _option(1000, "validate every N steps (0: only at the end)")
    eval_max_samples: int = _option(500, "validation sentences translated for BLEU/chrF at each evaluation")
    eval_num_beams: int = _option(1, "beam size of the periodic validation (1: greedy)")
    eval_batch_size: int = _option(64, "sentences per generation batch")
    save_steps: int = _option(1000, "checkpoint every N steps (0: only at the end)")
    save_total_limit: typing.Optional[int] = _option(5, "keep the newest N checkpoints (none: keep all)")
    resume_from_checkpoint: typing.Optional[str] = _option(None, "'latest' or a checkpoint folder")
    overwrite_output_dir: bool = _option(False, "start afresh in an output_dir that holds checkpoints (deletes them)")
    average_checkpoints: int = _option(0, "at the end, average the last N checkpoints into the final model")
    # final test evaluation and saved generation defaults (Section 6.1: beam 4, alpha 0.6)
    num_beams: int = _option(4, "beam size of the test evaluation and the saved generation config")
    length_penalty: float = _option(0.6, "length penalty of the test evaluation and the saved generation config")
    max_new_tokens_extra: int = _option(50, "generate at most source length + N tokens (Section 6.1)")
    test_max_samples: typing.Optional[int] = _option(None, "translate only the first N test sentences")
    num_samples_to_print: int = _option(5, "sample translations printed at the end")
    plot: bool = _option(True, "write training_curves.png at the end (needs matplotlib)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_POSITIVE_INTS = ("vocab_size", "max_source_length", "max_target_length", "max_steps", "max_tokens",
                  "gradient_accumulation_steps", "warmup_steps", "logging_steps", "eval_max_samples",
                  "eval_num_beams", "eval_batch_size", "num_beams", "max_consecutive_bad_steps")
_NON_NEGATIVE_INTS = ("eval_steps", "save_steps", "average_checkpoints", "num_samples_to_print", "max_new_tokens_extra")


def _field_types() -> dict[str, typing.Any]:
    return typing.get_type_hints(TrainingConfig)


def _unwrap_optional(annotation):
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        return next(arg for arg in args if arg is not type(None)), True
    return annotation, False


def _reads_as_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


def _check_value(key: str, value, where: str):
    """Return `value` converted to the field's type, or raise ValueError naming `where` and `key`."""
    annotation, optional = _unwrap_optional(_field_types()[key])
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(TrainingConfig)}[key]

    def fail(expected):
        raise ValueError(f"{where}: '{key}' must be {expected}, got {value!r}.")

    if value is None:
        if optional:
            return None
        fail(annotation.__name__)
    if annotation is bool:
        if not isinstance(value, bool):
            fail("true or false")
    elif annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer, unquoted and written out (1000, not '1000' or 1e3)"
                 if isinstance(value, str) and _reads_as_number(value) else "an integer")
    elif annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads a number in exponent form without a dot (1e-9) as text
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        value = float(value)
        if not math.isfinite(value):
            fail("a finite number")
    elif annotation is str:
        if isinstance(value, bool):
            fail("a string (YAML reads an unquoted no, yes, off or on as false or true: quote it)")
        if not isinstance(value, str):
            fail("a string")
    elif annotation is dict:
        if not isinstance(value, dict):
            fail("a mapping")
    if choices is not None and value not in choices:
        fail(f"one of {', '.join(choices)}")
    return value


def validate_config(config: TrainingConfig, sources: dict[str, str] | None = None) -> TrainingConfig:
    """Check ranges that types cannot express; errors name the file or flag the value came from."""
    sources = sources or {}

    def fail(key, expected):
        where = sources.get(key, "default")
        raise ValueError(f"{where}: '{key}' must be {expected}, got {getattr(config, key)!r}.")

    for key in _POSITIVE_INTS:
        if getattr(config, key) <= 0:
            fail(key, "a positive integer")
    for key in _NON_NEGATIVE_INTS:
        if getattr(config, key) < 0:
            fail(key, "zero or a positive integer")
    if not 0 <= config.seed < 2**31:  # each process adds its rank; numpy takes up to 2**32 - 1
        fail("seed", "a whole number from 0 to 2**31 - 1")
    if not config.output_dir.strip():
        fail("output_dir", "a folder path")
    if Path(config.output_dir).exists() and not Path(config.output_dir).is_dir():
        fail("output_dir", "a folder (this is a file)")
    if config.resume_from_checkpoint not in (None, "latest") and not Path(config.resume_from_checkpoint).is_dir():
        fail("resume_from_checkpoint", "'latest' or an existing checkpoint folder")  # before the output folder is made
    if config.model_overrides:
        import inspect

        from .configuration_seq2seq import Seq2SeqTransformerConfig

        known = set(inspect.signature(Seq2SeqTransformerConfig.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(config.model_overrides) - known)
        if unknown:
            fail("model_overrides", f"a mapping of Seq2SeqTransformerConfig fields (unknown: {', '.join(unknown)})")
        taken = sorted(set(config.model_overrides) & set(RUN_SET_MODEL_FIELDS))
        if taken:
            fail("model_overrides", "fields other than those the run sets itself (" + "; ".join(
                f"{field}: {RUN_SET_MODEL_FIELDS[field]}" for field in taken) + ")")
    # The model, the tokenizer and its size are checked before any work, which with --overwrite_output_dir
    # includes deleting an earlier run's checkpoints.
    _check_model_overrides(config, fail)
    if config.tokenizer is not None and not resolve_path(config.tokenizer).exists():
        fail("tokenizer", "an existing tokenizer folder or tokenizer.json file" + (
            " (or none: a resumed run uses its checkpoint's)" if config.resume_from_checkpoint else ""))
    if config.tokenizer is None:
        from .tokenization import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, SPECIAL_TOKENS

        if not MIN_VOCAB_SIZE <= config.vocab_size <= MAX_VOCAB_SIZE:
            fail("vocab_size", f"at least {MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens, 256 byte tokens and 1 "
                               f"more) and at most {MAX_VOCAB_SIZE:,} for the BPE trained when no tokenizer is given")
    if config.torch_threads is not None and config.torch_threads < 1:
        fail("torch_threads", "a positive integer or null")
    if config.save_total_limit is not None and config.save_total_limit < 1:
        fail("save_total_limit", "a positive integer or null")
    if config.max_train_samples is not None and config.max_train_samples < 1:
        fail("max_train_samples", "a positive integer or null")
    if config.test_max_samples is not None and config.test_max_samples < 1:
        fail("test_max_samples", "a positive integer or null")
    if config.lr_scale <= 0:
        fail("lr_scale", "a positive number")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(config, key) < 1.0:
            fail(key, "a number in [0, 1)")
    if config.adam_epsilon <= 0:
        fail("adam_epsilon", "a positive number")
    if config.weight_decay < 0:
        fail("weight_decay", "zero or a positive number")
    if not 0.0 <= config.label_smoothing < 1.0:
        fail("label_smoothing", "a number in [0, 1)")
    if config.max_grad_norm is not None and config.max_grad_norm < 0:
        fail("max_grad_norm", "a positive number or null")
    if config.max_time_minutes is not None and config.max_time_minutes <= 0:
        fail("max_time_minutes", "a positive number or null")
    if config.length_penalty != config.length_penalty:
        fail("length_penalty", "a number")
    if config.average_checkpoints > 0 and config.save_total_limit is not None and config.save_total_limit < config.average_checkpoints:
        raise ValueError(
            f"{sources.get('average_checkpoints', 'default')}: 'average_checkpoints' ({config.average_checkpoints}) needs "
            f"'save_total_limit' ({config.save_total_limit}, from {sources.get('save_total_limit', 'default')}) to be at "
            "least as large, or the checkpoints to average would be deleted."
        )
    for key in ("max_source_length", "max_target_length"):
        if getattr(config, key) > config.max_tokens:
            raise ValueError(
                f"{sources.get(key, 'default')}: '{key}' ({getattr(config, key)}) is larger than 'max_tokens' "
                f"({config.max_tokens}, from {sources.get('max_tokens', 'default')}): a sentence that long could never fit "
                "in a batch. Lower it or raise max_tokens."
            )
    if config.dataset_config_name is not None and config.dataset_name is None:
        fail("dataset_config_name", "given only with dataset_name")
    if config.dataset_name is None and config.train_file is None and (config.validation_file or config.test_file):
        fail("train_file", "given when validation_file or test_file is given")
    return config


def load_yaml_config(path: str | os.PathLike, lines: dict | None = None) -> dict:
    """Read a YAML recipe; unknown keys and values of the wrong type raise ValueError naming file, line and key.
    `lines`, when given, receives each setting's line number."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"Training config file {str(path)!r} is a folder.")
    if not path.is_file():
        raise FileNotFoundError(f"Training config file {str(path)!r} does not exist.")

    class UniqueKeyLoader(yaml.SafeLoader):
        """safe_load, except that a key given twice is an error: PyYAML would keep the last one silently."""

        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key_node, deep=deep) for key_node, _ in node.value]
            for index, (key_node, _) in enumerate(node.value):
                if keys[index] in keys[:index]:
                    raise ValueError(f"{path}, line {key_node.start_mark.line + 1}: '{keys[index]}' is given twice.")
                with contextlib.suppress(TypeError):  # the top level's keys come first; nested ones keep those
                    key_lines.setdefault(keys[index], key_node.start_mark.line + 1)
            return super().construct_mapping(node, deep)

    key_lines = {} if lines is None else lines

    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}).") from error
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level, got {type(raw).__name__}.")
    known = set(_field_types())
    values = {}
    for key, value in raw.items():
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = (f" Did you mean '{close[0]}'?" if close else
                    " (YAML reads an unquoted no, yes, off or on as false or true: quote it.)" if isinstance(key, bool) else "")
            raise ValueError(f"{path}, line {key_lines[key]}: unknown setting '{key}'.{hint}")
        values[key] = _check_value(key, value, f"{path}, line {key_lines[key]}")
    return values


def _flag_type(key: str):
    annotation, optional = _unwrap_optional(_field_types()[key])

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if annotation is dict:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise argparse.ArgumentTypeError(f"expected a JSON object: {error}") from error
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError("expected a JSON object")
            return value
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        return text

    parse.__name__ = annotation.__name__
    return parse


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train the Transformer of 'Attention Is All You Need'. Without data arguments it trains on the "
        "built-in English->German number-words task (configs/train-tiny.yaml). The defaults shown are the paper's "
        "base recipe; a --config YAML file overrides them, and flags override both.",
    )
    parser.add_argument("--config", help="YAML recipe, e.g. configs/train-tiny.yaml")
    for spec in dataclasses.fields(TrainingConfig):
        annotation, _ = _unwrap_optional(_field_types()[spec.name])
        help_text = spec.metadata.get("help", "")
        default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
        if default not in (None, "", [], {}):
            help_text += f" (default: {default})".replace("%", "%%")
        if annotation is bool:
            parser.add_argument(f"--{spec.name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(
                f"--{spec.name}",
                type=_flag_type(spec.name),
                choices=spec.metadata.get("choices"),
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=spec.name.upper() if spec.metadata.get("choices") is None else None,
            )
    return parser


DEFAULT_RECIPE = "configs/train-tiny.yaml"
DATA_FLAGS = ("dataset_name", "train_file", "validation_file", "test_file")


def parse_config(argv: list[str] | None = None) -> TrainingConfig:
    """Defaults < YAML file < flags.

    Without --config and without data, the recipe is configs/train-tiny.yaml: the main job (the tiny preset on
    the built-in task). With data but no --config, the defaults are the paper's base recipe.
    """
    args = vars(build_arg_parser().parse_args(argv))
    config_path = args.pop("config", None)
    if config_path is None and not any(args.get(flag) for flag in DATA_FLAGS) and (REPO_ROOT / DEFAULT_RECIPE).is_file():
        config_path = str(REPO_ROOT / DEFAULT_RECIPE)
        print(f"No --config and no data given: using the default recipe {DEFAULT_RECIPE} (the built-in task).")
    values, sources = {}, {}
    if config_path:
        lines = {}
        for key, value in load_yaml_config(config_path, lines).items():
            values[key], sources[key] = value, f"{config_path}, line {lines[key]}"
    for key, value in args.items():
        values[key] = _check_value(key, value, f"flag --{key}")
        sources[key] = f"flag --{key}"
    return validate_config(TrainingConfig(**values), sources)


def resolve_path(path: str) -> Path:
    """A path as given, or else relative to the repository (so presets resolve from any working directory)."""
    candidate = Path(path)
    if candidate.exists() or candidate.is_absolute():
        return candidate
    in_repo = REPO_ROOT / path
    return in_repo if in_repo.exists() else candidate


# ----------------------------------------------------------------------------------------------------------
# The learning-rate schedule (Section 5.3)
# ----------------------------------------------------------------------------------------------------------


def inverse_sqrt_lr(step: int, d_model: int, warmup_steps: int, scale: float = 1.0) -> float:
    """lr = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), for update number `step` >= 1."""
    step = max(step, 1)
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)


class InverseSqrtSchedule:
    """LambdaLR factor: the optimizer's base lr is 1, so the factor is the learning rate itself.

    LambdaLR evaluates the factor at 0 for the first update, so update k (counted from 1) uses factor(k - 1).
    A callable object, not a closure, so that `LambdaLR.state_dict()` records its settings as plain numbers.
    """

    def __init__(self, d_model: int, warmup_steps: int, scale: float):
        self.d_model, self.warmup_steps, self.scale = d_model, warmup_steps, scale

    def __call__(self, scheduler_step: int) -> float:
        return inverse_sqrt_lr(scheduler_step + 1, self.d_model, self.warmup_steps, self.scale)


def keep_configured_schedule(scheduler, configured: list[dict], source) -> None:
    """After `scheduler.load_state_dict`, put back the schedule settings this run was configured with (`configured`:
    each factor's `vars` before loading). LambdaLR restores a callable object's settings along with its step, which
    would silently ignore a changed --lr_scale or --warmup_steps on resume; a schedule of plain functions (as
    transformers builds) follows the new settings, and so does this one, with a warning."""
    for schedule, settings in zip(scheduler.lr_lambdas, configured):
        changed = {key: (vars(schedule).get(key), value) for key, value in settings.items() if vars(schedule).get(key) != value}
        if not changed:
            continue
        vars(schedule).update(settings)
        # The optimizer's saved learning rate is the old schedule's for the next update.
        scheduler._last_lr = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler._last_lr):
            group["lr"] = lr
        detail = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
        logger.warning("%s: the learning-rate schedule changed (%s); the resumed run follows the new one.", source, detail)


OPTIMIZER_SETTINGS = {"betas": "--adam_beta1/--adam_beta2", "eps": "--adam_epsilon", "weight_decay": "--weight_decay"}


def keep_configured_optimizer(optimizer, configured: list[dict], source) -> None:
    """After `optimizer.load_state_dict`, put back this run's Adam settings (`configured`: each parameter group's
    before loading). torch restores the saved groups' betas, epsilon and weight decay with the moments, which
    silently ignored a changed --adam_beta2 or --weight_decay on resume while eval_results.json recorded the new
    value; as with the learning-rate schedule, the resumed run follows the new settings, with a warning."""
    changed = {}
    for group, settings in zip(optimizer.param_groups, configured):
        for key, value in settings.items():
            saved = group.get(key)
            if (list(saved) if isinstance(saved, (list, tuple)) else saved) != (
                    list(value) if isinstance(value, tuple) else value):
                changed[key] = (saved, value)
                group[key] = value
    if changed:
        detail = ", ".join(f"{OPTIMIZER_SETTINGS[key]} {tuple(old) if isinstance(old, list) else old!r} -> {new!r}"
                           for key, (old, new) in changed.items())
        logger.warning("%s: the optimizer's settings changed (%s); the resumed run follows the new ones.", source, detail)


def make_optimizer_and_scheduler(model: torch.nn.Module, config: TrainingConfig, d_model: int):
    """Adam(beta1, beta2, eps) with lr = the schedule (Section 5.3); AdamW when weight decay is set.

    The fused implementation (one pass over parameters, gradients and moments) when every parameter is a float
    tensor on a device torch has fused kernels for: on a 2-core CPU it takes the base model's update from ~260 ms
    to ~40 ms. Same update rule as the default implementation, up to float rounding.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    betas = (config.adam_beta1, config.adam_beta2)
    options = dict(lr=1.0, betas=betas, eps=config.adam_epsilon)
    if config.weight_decay > 0:
        optimizer_class, options["weight_decay"] = torch.optim.AdamW, config.weight_decay
    else:
        optimizer_class = torch.optim.Adam
    try:
        optimizer = optimizer_class(parameters, fused=True, **options)
    except RuntimeError:  # a device or dtype without fused kernels
        optimizer = optimizer_class(parameters, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, InverseSqrtSchedule(d_model, config.warmup_steps, config.lr_scale))
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------------------
# RNG state (stored as JSON and tensors: nothing pickled)
# ----------------------------------------------------------------------------------------------------------


def capture_rng_state() -> tuple[dict, dict]:
    """(JSON-able python/numpy state, tensor state of torch and CUDA)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    json_state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gauss)},
    }
    tensor_state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensor_state["cuda"] = torch.cuda.get_rng_state_all()
    return json_state, tensor_state


def restore_rng_state(json_state: dict | None = None, tensor_state: dict | None = None) -> None:
    """Restore what `capture_rng_state` captured (either part alone, when the other is None)."""
    if json_state is not None:
        python = json_state["python"]
        random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
        state = json_state["numpy"]
        np.random.set_state((state["name"], np.array(state["keys"], dtype=np.uint32), state["pos"],
                             state["has_gauss"], state["cached_gaussian"]))
    if tensor_state is not None:
        torch.set_rng_state(tensor_state["torch"])
        if "cuda" in tensor_state and torch.cuda.is_available():
            # One state per GPU the saving process saw; a resume that sees fewer GPUs (CUDA_VISIBLE_DEVICES) restores
            # those it has (set_rng_state_all would index past them and refuse the checkpoint).
            torch.cuda.set_rng_state_all(tensor_state["cuda"][: torch.cuda.device_count()])


class preserved_rng:
    """Run a block (evaluation) without moving any random generator, so checkpoints do not depend on it."""

    def __enter__(self):
        self.saved = capture_rng_state()

    def __exit__(self, *exc):
        restore_rng_state(*self.saved)
        return False


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def load_raw_data(config: TrainingConfig):
    """DatasetDict with "source"/"target" columns and train/validation/test splits."""
    from .data import BUILTIN_SOURCE_LANG, BUILTIN_TARGET_LANG, load_parallel_data

    if uses_builtin_task(config) and (config.source_lang, config.target_lang) == (BUILTIN_SOURCE_LANG, BUILTIN_TARGET_LANG):
        raw = _builtin_task()
    else:
        raw = load_parallel_data(
            dataset_name=config.dataset_name,
            dataset_config_name=config.dataset_config_name,
            train_file=config.train_file,
            validation_file=config.validation_file,
            test_file=config.test_file,
            source_lang=config.source_lang,
            target_lang=config.target_lang,
        )
    if "train" not in raw:
        raise ValueError(f"{data_description(config)} has no 'train' split (its splits: {', '.join(raw) or 'none'}).")
    if config.max_train_samples is not None and len(raw["train"]) > config.max_train_samples:
        from datasets import DatasetDict

        # A new DatasetDict: `raw` may be the cached built-in task, which must stay whole.
        raw = DatasetDict({**raw, "train": raw["train"].select(range(config.max_train_samples))})
    return raw


@functools.lru_cache(maxsize=1)
def _builtin_task():
    """The built-in task's splits are fixed (independent of the training seed); generating them takes seconds."""
    from .data import builtin_task

    return builtin_task()


def data_record(dataset_name: str | None, dataset_config_name: str | None, train_file: str | None) -> dict:
    """How eval_results.json names the training data: `dataset`, and `dataset_name` and `dataset_config_name` (a Hub
    dataset) or `train_file` (local files), from a run's settings (the card reads these)."""
    if dataset_name:
        return {"dataset": dataset_name + (f"/{dataset_config_name}" if dataset_config_name else ""),
                "dataset_name": dataset_name, "dataset_config_name": dataset_config_name}
    if train_file:
        return {"dataset": str(train_file), "train_file": str(train_file)}
    return {"dataset": BUILTIN_DATASET}


def data_description(config: TrainingConfig) -> str:
    return data_record(config.dataset_name, config.dataset_config_name, config.train_file)["dataset"]


def batch_token_counts(batch: dict) -> tuple[int, int]:
    """(non-padding source tokens, target tokens that count in the loss)."""
    return int(batch["attention_mask"].sum()), int((batch["labels"] != -100).sum())


def collate(dataset, indices, collator) -> dict:
    """One padded batch from rows `indices` (a single Arrow read, not one per row)."""
    rows = dataset.select_columns(["input_ids", "labels"])[[int(i) for i in indices]]
    return collator([{"input_ids": s, "labels": t} for s, t in zip(rows["input_ids"], rows["labels"])])


# ----------------------------------------------------------------------------------------------------------
# Translation and evaluation
# ----------------------------------------------------------------------------------------------------------


LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")  # where a file read line by line splits (text mode: "\r" too)


def translate_texts(model, tokenizer, texts: list[str], batch_size: int = 64, num_beams: int | None = None,
                    length_penalty: float | None = None, max_new_tokens_extra: int = 50,
                    max_source_length: int | None = None, names: list[str] | None = None) -> list[str]:
    """Translate `texts`, batched by similar length (fast), returned in the input order.

    `num_beams`/`length_penalty` None take the model's generation config. Each batch may produce at most the
    longest source length + `max_new_tokens_extra` tokens (Section 6.1). Sources longer than `max_source_length`
    tokens are truncated, with a warning naming them (`names[i]`, default "sentence i+1" and its first words). Each
    translation is one line: line breaks the model generates become spaces.
    """
    model_was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Truncated by hand, keeping `</s>` last, for any tokenizer (transformers 4.x's truncation=True also stayed in the
    # tokenizer, and so in a tokenizer.json saved later).
    encoded = [tokenizer(text)["input_ids"] for text in texts]
    if max_source_length is not None:
        eos = tokenizer.eos_token_id
        long = [i for i, ids in enumerate(encoded) if len(ids) > max_source_length]
        if long:
            logger.warning("%d source(s) longer than %d tokens truncated to that length: %s%s", len(long),
                           max_source_length,
                           ", ".join(names[i] if names else f"sentence {i + 1} ({texts[i][:30]!r}...)" for i in long[:10]),
                           " ..." if len(long) > 10 else "")
        encoded = [ids if len(ids) <= max_source_length else ids[: max_source_length - 1] + [eos] for ids in encoded]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str] = [""] * len(texts)
    # One plain row of ids per source, whatever generation_config.json asks for: several returned sequences would
    # pair sources with other sources' translations.
    generation_kwargs = {"num_return_sequences": 1, "return_dict_in_generate": False}
    if num_beams is not None:
        generation_kwargs["num_beams"] = num_beams
    beams = num_beams if num_beams is not None else model.generation_config.num_beams
    if length_penalty is not None and (beams or 1) > 1:
        generation_kwargs["length_penalty"] = length_penalty
    pad_id = tokenizer.pad_token_id
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                longest = max(len(encoded[i]) for i in chunk)
                input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), longest), dtype=torch.long)
                for row, index in enumerate(chunk):
                    ids = encoded[index]
                    input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, : len(ids)] = 1
                # max_length (decoder start token included) rather than max_new_tokens: the saved generation
                # config sets max_length, and giving both makes transformers warn on every call.
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_length=longest + max_new_tokens_extra + 1,
                    **generation_kwargs,
                )
                decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
                for index, text in zip(chunk, decoded):
                    # A generated line break (the byte-level tokens of "\n", "\r") would split a translation over two
                    # lines of a line-aligned file; BLEU and chrF read it as a space anyway.
                    outputs[index] = LINE_BREAKS.sub(" ", text).strip()
    finally:
        model.train(model_was_training)
    return outputs


def load_saved_model(path: str | os.PathLike, dtype: torch.dtype | None = None, **kwargs):
    """`AutoModelForSeq2SeqLM.from_pretrained` of a saved folder (safetensors only; `kwargs` go to it) that refuses
    partly random weights. transformers fills a weight missing from the file, or of another shape than config.json
    says, with fresh random values and only logs it: the model would then translate garbage without an error."""
    # Importing this module ran the package's __init__, which registers our classes with the Auto factories.
    from transformers import AutoModelForSeq2SeqLM

    from .configuration_seq2seq import Seq2SeqTransformerConfig
    from .hub import load_reporting_random_weights

    config_file = Path(path) / "config.json"
    settings = ckpt.read_json_object(config_file, "a JSON model config")
    model_type = settings.get("model_type")
    if model_type != Seq2SeqTransformerConfig.model_type:
        raise ValueError(f"{config_file} says model_type {model_type!r}, not {Seq2SeqTransformerConfig.model_type!r}: "
                         "not a model of this package (a MarianMTModel converts with scripts/convert_marian.py).")
    try:  # the config's own check (heads that divide d_model...), naming the file
        Seq2SeqTransformerConfig.from_dict(settings)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{config_file}: {error}") from error
    check_generation_config(Path(path))
    check_weight_dtypes(Path(path))
    if (Path(path) / ckpt.MANIFEST_NAME).is_file() and (
        problem := ckpt.verify_checkpoint(path, hash_training_state=False)
    ) is not None:
        raise ValueError(
            f"{path}: {problem}. The folder's {ckpt.MANIFEST_NAME} no longer describes its files: damaged, or changed "
            f"after training wrote them (if the change was yours, delete {ckpt.MANIFEST_NAME})."
        )
    model, missing, mismatched, unused = load_reporting_random_weights(AutoModelForSeq2SeqLM, str(path), dtype=dtype,
                                                                       **kwargs)
    if missing or mismatched:
        raise ValueError(
            f"{path}: the weights do not fit the model its config.json describes (missing: {missing[:5] or 'none'}"
            f"{' ...' if len(missing) > 5 else ''}, wrong shape: {mismatched[:5] or 'none'}); refusing to run partly "
            "random weights."
        )
    refuse_unused_or_broken_weights(path, model, unused)
    return model


def refuse_unused_or_broken_weights(path, model, unused: list[str]) -> None:
    """A loaded model whose files held tensors it has no place for (config.json describes less than the weights hold,
    fewer layers say: the model would be cut short), or whose weights are not finite, is refused, naming `path`."""
    if unused:
        raise ValueError(f"{path}: the weights file holds tensors the model its config.json describes has no place for "
                         f"({', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}); config.json and the weights do "
                         "not belong together.")
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if broken:
        raise ValueError(f"{path}: the saved weights hold NaN or infinite values ({', '.join(broken[:5])}): damaged.")


def check_weight_dtypes(folder: Path) -> None:
    """Every tensor of the folder's safetensors files (the shards its index lists) is floating-point (the model has
    no other): an integer tensor for a weight would be cast, and loaded as whole numbers (zeros for initialised
    weights), without a word."""
    from safetensors import SafetensorError, safe_open

    for file in ckpt.weight_files(folder, ValueError):  # a shard index that is damaged, or lists a missing shard
        try:
            with safe_open(str(file), framework="pt") as weights:
                wrong = [f"{name} ({dtype})" for name in weights.keys()
                         if not (dtype := weights.get_slice(name).get_dtype()).startswith(("F", "BF"))]
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file}: cannot read the weights ({error}); the file is damaged or incomplete.") from error
        if wrong:
            raise ValueError(f"{file}: weights must be floating-point, and {', '.join(wrong[:5])} are not: damaged, "
                             "or not written for this model.")


CARRIAGE_RETURN_INSIDE = ("contains a carriage return inside the line: are its lines ended by carriage returns "
                          "alone (old Mac files)? Convert the line endings to line feeds")


def split_lines(text: str) -> list[str]:
    """`text`'s lines, split at line feeds only (and "\\r\\n"): `str.splitlines` also splits at U+2028, form feeds
    and other separators that can sit inside a sentence, which would shift every later line against its partner."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_text_lines(path: str | os.PathLike, option: str | None = None) -> list[str]:
    """`split_lines` of a UTF-8 text file (`-`: stdin), without a leading byte order mark, as the data files are
    read; a file that cannot be read, bytes that are not UTF-8, NUL bytes and a carriage return inside the first line
    (lines ended by them alone) raise ValueError naming the file (and the `option` that gave it) and the line."""
    name = "<stdin>" if str(path) == "-" else str(path)
    name = f"{option} {name}" if option else name
    if str(path) == "-":  # the bytes, not Python's decoding of them (which would hide bad bytes as surrogates)
        stdin = sys.stdin
        data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8", "surrogateescape")
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"{name}: cannot be read ({error.strerror or error}).") from error
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # before UTF-32's, which begins with UTF-16's
        raise ValueError(f"{name}: UTF-16 text (it starts with a UTF-16 byte order mark); save it as UTF-8.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{name}, line {line}: not UTF-8 text ({error.reason}).") from error
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise ValueError(f"{name}, line {line}: contains NUL bytes (is this a binary file?).")
    lines = split_lines(text.removeprefix("\ufeff"))
    if lines and "\r" in lines[0].strip():
        raise ValueError(f"{name}, line 1: {CARRIAGE_RETURN_INSIDE}.")
    return lines


def finite_float(text: str) -> float:
    """An argparse type: a number, not nan or inf (which `generate` would take without a word)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def check_device(name: str | None, option: str = "--device") -> None:
    """A clear error for a device name torch does not know, or a GPU this machine does not have."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"{option} {name!r}: not a device name ({error}).") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {name!r}: no CUDA device on this machine.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{option} {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if device.type == "meta":
        raise ValueError(f"{option} {name!r}: the meta device holds no data; name a device that computes (cpu, cuda).")
    backend = getattr(torch, device.type, None) if device.type not in ("cpu", "cuda") else None
    if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
        raise ValueError(f"{option} {name!r}: no {device.type} device on this machine.")


def is_device_path(path: Path) -> bool:
    """A path the user named under /dev or /proc (`/dev/stdout`): by its name, as it resolves to whatever fd 1 is."""
    return str(path.absolute()).startswith(("/dev/", "/proc/"))


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (yet)
        return first.resolve() == second.resolve()


def check_output_file(path: str | None, option: str, inputs: dict | None = None, model_dir: str | None = None) -> None:
    """Before the work: a file can be written at `path` (not a folder, and its folder exists), and writing it destroys
    none of `inputs` ({option: path}: what the run reads, or its other outputs) and nothing in the `model_dir` folder.
    Devices (`/dev/stdout`) may be shared."""
    if path is None or path == "-":
        return
    target = Path(path)
    for other_option, other in (inputs or {}).items():
        if other not in (None, "-") and not is_device_path(target) and _same_file(target, Path(other)):
            raise ValueError(f"{option} {path!r} is the same file as {other_option}: writing it would destroy that. "
                             f"Choose another {option}.")
    if model_dir is not None and Path(model_dir).is_dir() and target.resolve().is_relative_to(Path(model_dir).resolve()):
        raise ValueError(f"{option} {path!r} lies inside the model folder {model_dir!r} (--model): writing there could "
                         f"break the model. Choose a path outside it.")
    if target.is_dir():
        raise ValueError(f"{option} {path!r} is a folder, not a file.")
    if not target.parent.is_dir():
        raise ValueError(f"{option} {path!r}: its folder {str(target.parent)!r} does not exist.")
    try:
        if os.path.lexists(target):
            if target.is_file():  # not a pipe or a device: opening one would end its reader
                open(target, "a").close()  # appends nothing: the file keeps its contents
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            os.unlink(target)
    except OSError as error:
        raise ValueError(f"{option} {path!r} cannot be written ({error.strerror}).") from error


def write_output_file(path: str | os.PathLike, text: str) -> None:
    """Write a user's output file (translations, predictions, results). A regular file, or a new one, is written
    atomically, so a failed or killed write leaves its old contents whole. A symlink, a pipe or a device is written
    through: replacing a link, `/dev/stdout` (one) or a named pipe would break what they lead to. `/dev/...` and
    `/proc/...` paths are opened for appending, as "w" would truncate a file the shell opened with `>>`."""
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_file()):
        with open(target, "a" if is_device_path(target) else "w", encoding="utf-8") as handle:
            handle.write(text)
        return
    ckpt.atomic_write_text(target, text)


def load_model_and_tokenizer(path: str | os.PathLike, device: str | None = None, dtype: str | None = None):
    """A saved model folder (safetensors only) and its tokenizer, in eval mode on `device` (default: cuda if any)."""
    from .tokenization import load_tokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"No saved model in {str(path)!r} (config.json is missing).")
    torch_dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = load_saved_model(path, torch_dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    tokenizer = load_tokenizer(path)
    check_special_tokens(tokenizer, str(path))
    check_tokenizer_matches(tokenizer, model.config, path)
    return model, tokenizer


def validation_summary(metrics: dict) -> str:
    return (f"val_loss {metrics['val_loss']:.4f}  val_bleu {metrics['val_bleu']:.2f}  val_chrf {metrics['val_chrf']:.2f}  "
            f"val_exact_match {metrics['val_exact_match']:.3f}")


def check_tokenizer_matches(tokenizer, config, where) -> None:
    """The tokenizer pads and ends sentences with the ids the model was trained with, and fits its vocabulary: a
    tokenizer with two tokens swapped translates, silently, into nonsense."""
    for name in ("pad_token_id", "eos_token_id"):
        ours, theirs = getattr(tokenizer, name), getattr(config, name)
        if theirs is not None and ours not in (theirs if isinstance(theirs, list) else [theirs]):
            raise ValueError(f"{where}: the tokenizer's {name} is {ours}, config.json's {theirs}: the tokenizer and the "
                             "model do not belong together.")
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if len(tokenizer) > config.vocab_size or largest >= config.vocab_size:
        raise ValueError(f"{where}: its tokenizer has {len(tokenizer)} tokens (ids up to {largest}), but the model only "
                         f"{config.vocab_size} (config.json's vocab_size): the two do not belong together.")


def check_special_tokens(tokenizer, where: str, needed=("pad_token", "eos_token"),
                         remedy: str = "this folder's tokenizer is not one the model was trained with") -> None:
    """The ids a model is run with (padding, the end of a sentence; training also needs the decoder's start), and a
    tokenizer that ends every text with that end: without it the model never sees where a sentence stops, nor learns
    to stop."""
    missing = [name for name in needed if getattr(tokenizer, f"{name}_id") is None]
    if missing:
        raise ValueError(f"{where}: the tokenizer has no {', '.join(missing)}; this model needs {', '.join(needed)}: "
                         f"{remedy}.")
    encoded = tokenizer("a", text_target="a")
    if encoded["input_ids"][-1:] != [tokenizer.eos_token_id] or encoded["labels"][-1:] != [tokenizer.eos_token_id]:
        raise ValueError(f"{where}: the tokenizer does not end a text with its end-of-sentence token "
                         f"{tokenizer.eos_token!r} (no post-processor adds it), so the model could not learn or see where a "
                         f"sentence ends: {remedy}.")


def check_num_beams(num_beams: int | None, model, option: str = "--num_beams") -> None:
    """A beam search's first step has one hypothesis per token: more beams than the vocabulary only cost memory and
    time (100,000 beams of a 500-token model took 16 GB and minutes without a word). None: the generation config's."""
    if num_beams is None:
        num_beams, option = model.generation_config.num_beams, "generation_config.json's num_beams"
    if num_beams is not None and num_beams > model.config.vocab_size:
        raise ValueError(f"{option} {num_beams}: more beams than the model has tokens ({model.config.vocab_size}).")


def check_generation_config(path: Path) -> None:
    """A saved generation_config.json that transformers would ignore (not JSON) or fail on at the first `generate`
    (no beams, a negative length, a number given as text, a token id outside the vocabulary) is refused at load,
    naming the file."""
    file = path / "generation_config.json"
    if not file.is_file():
        return
    settings = ckpt.read_json_object(file, "JSON generation settings")
    for field, low in (("num_beams", 1), ("num_return_sequences", 1), ("max_length", 1), ("max_new_tokens", 1),
                       ("min_length", 0), ("min_new_tokens", 0), ("top_k", 0), ("no_repeat_ngram_size", 0)):
        value = settings.get(field)
        if value is not None and (type(value) is not int or value < low):
            raise ValueError(f"{file}: {field!r} must be an integer >= {low}, got {value!r}.")
    for field in ("length_penalty", "temperature", "top_p", "repetition_penalty"):
        value = settings.get(field)
        if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):
            raise ValueError(f"{file}: {field!r} must be a finite number, got {value!r}.")
    if settings.get("do_sample") and settings.get("temperature") is not None and settings["temperature"] <= 0:
        raise ValueError(f"{file}: sampling ('do_sample': true) needs a 'temperature' above 0, got "
                         f"{settings['temperature']!r}.")
    vocab_size = ckpt.read_json_object(path / "config.json", "a JSON model config").get("vocab_size")
    for field in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "forced_bos_token_id",
                  "forced_eos_token_id"):
        value = settings.get(field)
        if value is not None and type(vocab_size) is int and not all(
                type(token) is int and 0 <= token < vocab_size for token in (value if isinstance(value, list) else [value])):
            raise ValueError(f"{file}: {field!r} must be a token id from 0 to {vocab_size - 1} (or a list of them), got "
                             f"{value!r}.")


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not predictions:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)


# sacrebleu's command line picks these for a target language (`-l en-zh`); everything else gets "13a". Keys are
# ISO 639-1 codes and the 639-3 ones FLORES and OPUS use (zho_Hans, cmn, yue, jpn_Jpan, kor_Hang).
LANGUAGE_BLEU_TOKENIZERS = {"zh": "zh", "zho": "zh", "cmn": "zh", "yue": "zh", "wuu": "zh", "ja": "ja-mecab",
                            "jpn": "ja-mecab", "ko": "ko-mecab", "kor": "ko-mecab"}


@functools.lru_cache(maxsize=None)
def bleu_tokenizer(target_lang: str | None, tokenize: str | None = None) -> str:
    """The BLEU tokenizer for a target language: `tokenize` if given, else the one sacrebleu's command line picks
    (`LANGUAGE_BLEU_TOKENIZERS`; 13a splits no Chinese or Japanese words, and scores near 0 there). Japanese and
    Korean need sacrebleu's extras (`pip install "sacrebleu[ja]"`); without them the default falls back to "char"
    (BLEU over characters) with a warning, and the signature says "tok:char". A `tokenize` sacrebleu cannot build
    raises ValueError, before any translating."""
    import sacrebleu

    language = re.split(r"[-_]", target_lang or "")[0].lower()  # zh, zh_CN, zh-Hans, ZH
    name = tokenize or LANGUAGE_BLEU_TOKENIZERS.get(language, "13a")
    try:
        sacrebleu.metrics.BLEU(tokenize=name)
    except KeyError:
        raise ValueError(f"BLEU tokenizer {name!r} is not one of sacrebleu's: "
                         f"{', '.join(sorted(sacrebleu.metrics.BLEU.TOKENIZERS))}.") from None
    except (RuntimeError, ImportError, OSError) as error:  # missing extras; flores tokenizers download a model
        if tokenize is not None:
            raise ValueError(f"BLEU tokenizer {name!r} cannot be used here: {' '.join(str(error).split())}") from error
        logger.warning("BLEU for target language %r would use sacrebleu's %r tokenizer, which needs "
                       "`pip install \"sacrebleu[%s]\"`; scoring BLEU over characters instead (tok:char).",
                       target_lang, name, name[:2])
        return "char"
    return name


def translation_metrics(predictions: list[str], references: list[str], effective_order: bool = False,
                        tokenize: str = "13a") -> dict:
    """BLEU, chrF (with sacrebleu's signatures) from the package's `evaluate` module, plus exact match.

    `effective_order=True` is for one-word sentences (the built-in task's German numbers), where standard
    corpus BLEU has no 2-grams to count and would be 0 for perfect output. `tokenize`: BLEU's tokenizer
    (`bleu_tokenizer(target_lang)` picks it by language).
    """
    from .metrics import load_sacrebleu

    scores = load_sacrebleu().compute(predictions=predictions, references=references, effective_order=effective_order,
                                      tokenize=tokenize)
    signature = scores.get("signature") or {}
    return {
        "bleu": float(scores["bleu"]),
        "chrf": float(scores["chrf"]),
        "bleu_signature": signature.get("bleu"),
        "chrf_signature": signature.get("chrf"),
        "exact_match": exact_match(predictions, references),
    }


BUILTIN_DATASET = "builtin-number-words"


def uses_builtin_task(config: TrainingConfig) -> bool:
    return config.dataset_name is None and config.train_file is None


def validation_loss(model, dataset, collator, max_tokens: int) -> dict:
    """Token-weighted label-smoothed loss and NLL (perplexity) over a tokenized split, in eval mode."""
    from .data import TokenBatchSampler, token_lengths

    model_was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    source_lengths, target_lengths = token_lengths(dataset)
    # Validation keeps long pairs, so the batch must be able to hold the longest one.
    longest = int(max(source_lengths.max(), target_lengths.max()))
    sampler = TokenBatchSampler(source_lengths, target_lengths, max(max_tokens, longest), shuffle=False)
    total_loss = total_nll = 0.0
    total_tokens = 0
    try:
        with torch.no_grad():
            for indices in sampler:
                batch = {k: v.to(device) for k, v in collate(dataset, indices, collator).items()}
                output = model(**batch)
                tokens = int((batch["labels"] != -100).sum())
                total_loss += float(output.loss) * tokens
                total_nll += float(torch.nn.functional.cross_entropy(
                    output.logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum"))
                total_tokens += tokens
    finally:
        model.train(model_was_training)
    nll = total_nll / max(total_tokens, 1)
    return {"loss": total_loss / max(total_tokens, 1), "nll": nll, "ppl": math.exp(min(nll, 50.0))}


# ----------------------------------------------------------------------------------------------------------
# The training run
# ----------------------------------------------------------------------------------------------------------


def compiled_for_training(model):
    """`model` behind `torch.compile` (the `compile` option), for the training step only: the wrapper shares the
    model's parameters, while evaluation, generation and checkpoints keep using the model itself. Shapes are
    dynamic from the first step, since token batches change them at every step; a few shapes still compile anew
    (a batch of one row: torch specialises sizes 0 and 1; on a CPU, over 4096 target tokens; on a GPU, the first
    batch over 5 * 2^20 / d_model tokens, where Inductor's mix-order-reduction fusion starts)."""
    return torch.compile(model, dynamic=True)


def compute_loss(model, batch: dict) -> torch.Tensor:
    """Mean label-smoothed cross-entropy of one micro-batch, the output projection computed at labelled positions only
    (a module-level seam for fault-injection tests)."""
    return model(**batch, project_scored_positions_only=True).loss


class JsonlLog:
    """Append-only JSONL records (the visualisation reads them); written by the main process only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.records = 0  # in the file; a checkpoint saves the count, so that resume keeps exactly those
        self.kept = None  # the lines `truncate_after` keeps, written when the first new record is

    def truncate_after(self, step: int, records: int | None = None) -> None:
        """On resume, keep the first `records` records (what the checkpoint had seen: later ones are written again),
        or, for checkpoints that lack the count, the records up to the checkpoint's step; a line torn by a crash
        goes either way. The file is cut when the first new record comes: a resumed run stopped before that leaves
        the log as it was."""
        if not self.enabled:
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if records is not None and len(kept) >= records:
                break
            if records is not None or (record.get("step", 0) <= step and record.get("type") not in ("test", "end")):
                kept.append(line)
        self.kept, self.records = kept, len(kept)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            if self.kept is not None:
                ckpt.atomic_write_text(self.path, "".join(line + "\n" for line in self.kept))
                self.kept = None
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
                handle.flush()
        except OSError as error:
            raise ckpt.CheckpointError(f"Could not write the training log {str(self.path)!r} ({error.strerror or error}); "
                                       "the checkpoints written before are complete.") from error
        self.records += 1

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return records


TRACKER_RUN_NAME = "train"  # Accelerate's TensorBoard tracker writes into output_dir/<this>


def _tracker_choice(report_to: str):
    if report_to == "none":
        return None
    import importlib.util

    available = any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))
    if report_to == "tensorboard" and not available:
        raise ValueError("report_to=tensorboard but neither tensorboard nor tensorboardX is installed.")
    return "tensorboard" if available else None


def _tracker_hparams(config: TrainingConfig) -> dict:
    """TensorBoard accepts only scalars and strings as hyper-parameters."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in config.to_dict().items()}


def model_preset(config: TrainingConfig) -> str | Path:
    """`model_config` as a file (relative to the working directory or the repository) or a built-in preset name."""
    preset = resolve_path(config.model_config)
    return preset if preset.exists() else config.model_config


def _check_model_overrides(config: TrainingConfig, fail) -> None:
    """Before any work: the preset loads, and overrides that make an invalid model (heads that do not divide
    d_model...) are reported against `model_overrides`, not against the preset file they were applied to. A preset
    that is itself wrong, or missing, is reported by its own load, naming the file."""
    from .presets import load_preset

    try:
        load_preset(model_preset(config), **config.model_overrides)
    except ValueError as error:
        load_preset(model_preset(config))  # raises, naming the file, when the preset is wrong on its own
        fail("model_overrides", f"fields that make a valid model with {config.model_config} ({error})")


# Model config fields that `build_model` takes from the tokenizer and the recipe, and where to set them instead.
RUN_SET_MODEL_FIELDS = {
    "vocab_size": "the tokenizer's size (set vocab_size in the run's settings)",
    "pad_token_id": "the tokenizer's",
    "bos_token_id": "the tokenizer's",
    "eos_token_id": "the tokenizer's",
    "decoder_start_token_id": "the tokenizer's beginning-of-sentence token",
    "label_smoothing": "set label_smoothing in the run's settings",
}


def build_model(config: TrainingConfig, tokenizer):
    """A fresh model from the preset JSON, sized to the tokenizer, with the recipe's label smoothing."""
    from .modeling_seq2seq import Seq2SeqTransformerForConditionalGeneration
    from .presets import load_preset

    model_config = load_preset(
        model_preset(config),
        **config.model_overrides,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
        label_smoothing=config.label_smoothing,
    )
    return Seq2SeqTransformerForConditionalGeneration(model_config)


def load_weights(model, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load a saved state dict whose tied duplicates (output projection = embeddings) were dropped on save."""
    own = model.state_dict()
    for name, tensor in weights.items():
        if name in own and own[name].shape != tensor.shape:
            raise ckpt.CheckpointError(
                f"{source}: weights do not fit the model: {name} is {tuple(tensor.shape)} there and "
                f"{tuple(own[name].shape)} here (the model settings, model_config or model_overrides, differ from "
                "the ones that wrote it)."
            )
    loaded_storage = {own[name].data_ptr() for name in weights if name in own}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # A missing name is fine when it is an alias of a loaded tensor (the same storage).
    really_missing = [name for name in missing if own[name].data_ptr() not in loaded_storage]
    if really_missing or unexpected:
        raise ckpt.CheckpointError(
            f"{source}: weights do not fit the model (missing {really_missing[:5]}, unexpected {list(unexpected)[:5]})."
        )


def _apply_generation_defaults(model, config: TrainingConfig) -> None:
    """The saved generation config: the recipe's beam size, and its length penalty when beams are used."""
    model.generation_config.num_beams = config.num_beams
    # transformers rejects a length penalty without beam search when saving the generation config.
    model.generation_config.length_penalty = config.length_penalty if config.num_beams > 1 else 1.0


def _state_dict_for_saving(accelerator, model) -> dict:
    return accelerator.get_state_dict(model)


def save_tokenizer(tokenizer, directory) -> None:
    from .tokenization import save_tokenizer as save

    save(tokenizer, directory)


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def optimizer_state_for_saving(accelerator, model, optimizer) -> dict:
    """The optimizer state as plain tensors; under FSDP gathered into a full (unsharded) state dict."""
    if _is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(accelerator, model, optimizer, state: dict) -> None:
    if _is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer.optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def load_full_weights(accelerator, model, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load full (unsharded) weights into a prepared model; FSDP shards them on the way in."""
    if _is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        load_weights(accelerator.unwrap_model(model), weights, source)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing big blocks back to the kernel.

    glibc serves every allocation over 32 MB with a fresh mmap and unmaps it on free, so a buffer the training
    step allocates anew each step (the logits and their gradient, the embedding gradient: 76 MB each at the base
    preset with a 37k vocabulary) costs ~19k page faults, zero-filled by the kernel, every time. Measured on
    2 cores: a base step goes from ~2.0 s to ~1.5 s (the same for the MarianMTModel twin). The price is memory:
    the heap never shrinks, and until the big buffers find holes that fit they take new ones (a few hundred MB
    more resident memory at the base preset). `--no-keep_freed_memory` turns it off. Linux with glibc only;
    returns whether the settings were applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


NORM_CHUNK = 1 << 18  # float32 values per dot product in `squared_norm_on_cpu`


def squared_norm_on_cpu(grads: list) -> torch.Tensor:
    """The sum of the squares of float32 CPU tensors (float64): a BLAS dot product per chunk of `NORM_CHUNK`
    values, summed in float64. At the base preset on a 2-core Xeon 11 ms against 22 ms for
    `torch.nn.utils.get_total_norm`, and closer to a float64 recomputation (2e-8 against 2.5e-4 relative; on an
    AMD EPYC 1e-6 against 1.4e-4)."""
    return torch.stack([torch.dot(chunk, chunk) for g in grads for chunk in g.reshape(-1).split(NORM_CHUNK)]).double().sum()


def gradient_norm(parameters: list, max_norm: float | None, accelerator=None) -> float:
    """The total 2-norm of the parameters' gradients, after clipping them to `max_norm` when it is set; through
    `accelerator` when given (it unscales fp16 gradients, and FSDP, DeepSpeed and XLA, whose gradients are sharded
    or reduced inside accelerate, keep its own method).

    Without clipping only the norm is computed: `clip_grad_norm_(..., inf)` also multiplies every gradient by 1,
    one more pass over all of them (8 of its 20 ms at the base preset on 2 cores); float32 gradients on a CPU by
    `squared_norm_on_cpu`."""
    from accelerate.utils import DistributedType

    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    sharded = accelerator is not None and accelerator.distributed_type in (
        DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA
    )
    if max_norm or sharded or total_norm is None or any(type(g) is not torch.Tensor for g in grads):
        clip = torch.nn.utils.clip_grad_norm_ if accelerator is None else accelerator.clip_grad_norm_
        return float(clip(parameters, max_norm or float("inf")))
    if accelerator is not None:
        accelerator.unscale_gradients()
    if grads and all(g.device.type == "cpu" and g.dtype == torch.float32 and g.layout == torch.strided for g in grads):
        return math.sqrt(float(squared_norm_on_cpu(grads)))
    return float(total_norm(grads))


@dataclass
class LogWindow:
    """The steps the next `train` log record averages (those since the last record) and their training time, without
    evaluations and saves. Kept in checkpoints: a resumed run's first record covers the steps an uninterrupted
    run's would."""

    loss: float = 0.0
    tokens: float = 0.0
    steps: int = 0
    seconds: float = 0.0  # before `start`
    start: float = field(default_factory=time.monotonic)

    def add(self, loss: float, tokens: float) -> None:
        self.loss, self.tokens, self.steps = self.loss + loss, self.tokens + tokens, self.steps + 1

    def pause(self) -> None:
        self.seconds += time.monotonic() - self.start

    def resume(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return max(self.seconds + time.monotonic() - self.start, 1e-9)

    def state_dict(self) -> dict:
        return {"loss": self.loss, "tokens": self.tokens, "steps": self.steps, "seconds": self.seconds}

    @classmethod
    def from_state(cls, state) -> "LogWindow":
        """The window a checkpoint kept; an empty one for a checkpoint without (older) or with a malformed one."""
        fields = {"loss": (int, float), "tokens": (int, float), "steps": (int,), "seconds": (int, float)}
        if not (isinstance(state, dict) and all(type(state.get(key)) in kinds and 0 <= state[key] < math.inf
                                                for key, kinds in fields.items())):
            return cls()
        return cls(**{key: state[key] for key in fields})


def check_own_checkpoint(folder: Path) -> None:
    """A checkpoint of this loop: its trainer_state.json is a JSON object with the fields resuming reads (the
    stock Trainer's checkpoints, from finetune_trainer.py, share our manifest but not this state)."""
    file = folder / ckpt.TRAINER_STATE_NAME
    state = ckpt.read_json_object(file, "this training loop's state", ckpt.CheckpointError)
    missing = [key for key in ("step", "sampler") if key not in state]
    if missing:
        hint = (" It looks like a Seq2SeqTrainer checkpoint: resume it with scripts/finetune_trainer.py."
                if "global_step" in state else "")
        raise ckpt.CheckpointError(f"{file} lacks {', '.join(map(repr, missing))}: not a checkpoint of scripts/train.py."
                                   + hint)
    if type(state["step"]) is not int or state["step"] < 0 or not isinstance(state["sampler"], dict):
        raise ckpt.CheckpointError(f"{file}: 'step' must be a whole number >= 0 and 'sampler' an object, got "
                                   f"{state['step']!r} and {type(state['sampler']).__name__}.")
    # Checked before anything is restored: a bad value found later would come after the log was cut to the step.
    fields = {**{key: (state.get(key), int) for key in RESUMED_COUNTS},
              **{f"sampler.{key}": (state["sampler"].get(key), int) for key in ("epoch", "batches_consumed")},
              "elapsed_s": (state.get("elapsed_s"), (int, float))}
    for key, (value, kinds) in fields.items():
        if type(value) not in ((kinds,) if isinstance(kinds, type) else kinds) or not 0 <= value < math.inf:
            what = "a whole number" if kinds is int else "a number"
            raise ckpt.CheckpointError(f"{file}: {key!r} must be {what} >= 0, got {value!r}.")


# The counters of trainer_state.json that a resumed run continues from.
RESUMED_COUNTS = ("skipped_steps", "consecutive_bad_steps", "tokens_seen")


@contextlib.contextmanager
def restoring(file: Path, what: str):
    """Name the file when restoring `what` from it fails: a damaged file, or one another program wrote, fails in
    torch or the scheduler with a message that names neither."""
    try:
        yield
    except ckpt.CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
        raise ckpt.CheckpointError(f"{file}: cannot restore {what} from it ({type(error).__name__}: {error}).") from error


def check_optimizer_state(state, optimizer, model, file: Path) -> None:
    """The saved optimizer state fits this model's parameters, group by group and tensor by tensor. torch checks
    only the number of parameters per group, and a moment of another shape would reach the fused Adam kernel, which
    reads and writes past it."""
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict) and isinstance(state.get("param_groups"), list)
            and all(isinstance(group, dict) and isinstance(group.get("params"), list) for group in state["param_groups"])):
        raise ckpt.CheckpointError(f"{file}: not an optimizer state (an object with 'state' and 'param_groups').")
    saved_sizes = [len(group["params"]) for group in state["param_groups"]]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != sizes:
        raise ckpt.CheckpointError(f"{file}: its parameter groups hold {saved_sizes} parameters, this model's "
                                   f"{sizes}: another model or optimizer wrote it.")
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    for saved_group, group in zip(state["param_groups"], optimizer.param_groups):
        for index, parameter in zip(saved_group["params"], group["params"]):
            entry = state["state"].get(index, {})
            if not isinstance(entry, dict):
                raise ckpt.CheckpointError(f"{file}: the state of parameter {index} is not an object.")
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() > 0 and (
                        value.shape != parameter.shape or not value.is_floating_point()):
                    raise ckpt.CheckpointError(
                        f"{file}: {key!r} of {names.get(id(parameter), f'parameter {index}')} is {value.dtype} "
                        f"{tuple(value.shape)}; the parameter is {tuple(parameter.shape)}.")


# What a run trains on: resuming with other values would continue the data order, and the model, on other data.
# A train_file given by another path (moved) is only warned of.
RESUMED_DATA_FIELDS = ("train_file", "dataset_name", "dataset_config_name", "source_lang", "target_lang",
                       "max_source_length", "max_target_length", "max_train_samples")


def check_same_data(folder: Path, config) -> None:
    """Refuse to resume `folder` with other data settings than the run that wrote it, naming each change."""
    file = folder / ckpt.TRAINER_STATE_NAME
    saved = ckpt.read_json_object(file, "this training loop's state", ckpt.CheckpointError).get("config") or {}

    old_file, new_file = saved.get("train_file"), config.train_file
    changed = [f"{field}: {saved[field]!r} there, {getattr(config, field)!r} now" for field in RESUMED_DATA_FIELDS
               if field in saved and saved[field] != getattr(config, field)
               and not (field == "train_file" and old_file is not None and new_file is not None)]
    if old_file is not None and new_file is not None and resolve_path(old_file).resolve() != resolve_path(new_file).resolve():
        # A job often copies its data to a new scratch folder each time it runs: a moved file is taken as the same
        # data (the fingerprint of its tokenized pairs, checked when the checkpoint loads, refuses other pairs).
        logger.warning("Resuming %s on train_file %r; the checkpoint was trained on %r. Taken as the same data, moved "
                       "(if its tokens are the same).", folder, new_file, old_file)
    if changed:
        raise ckpt.CheckpointError(f"{folder} was trained on other data ({'; '.join(changed)}). Resume with the data "
                                   "settings the run was started with; to go on from its weights on other data, "
                                   f"fine-tune it: scripts/finetune_trainer.py --model {folder}.")


def check_same_model(folder: Path, config) -> None:
    """Refuse to resume `folder` into a model its config.json does not describe: weights of the same shapes can
    still mean another model (another activation, positional layout or embedding scale), and a run would go on
    training them as that model, then average its checkpoints with the earlier ones."""
    with restoring(folder / "config.json", "the model's config"):
        saved = type(config).from_dict(ckpt.read_json_object(folder / "config.json", "a JSON model config",
                                                             ckpt.CheckpointError)).to_dict()
    now = config.to_dict()
    differ = ckpt.architecture_differences(saved, now)
    if differ:
        detail = "; ".join(f"{key}: {saved.get(key)!r} there, {now.get(key)!r} now" for key in differ)
        raise ckpt.CheckpointError(f"{folder} holds another model than this run builds (config.json: {detail}). "
                                   "Resume with the model settings (model_config, model_overrides) it was started with.")


class Trainer:
    """One training run; `run()` returns the final metrics. Constructed by `train(config)`."""

    def __init__(self, config: TrainingConfig):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config
        self.output_dir = Path(config.output_dir)
        self.start_time = time.monotonic()
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        if config.keep_freed_memory:
            keep_freed_memory()
        tracker = _tracker_choice(config.report_to)
        launched = int(os.environ.get("LOCAL_RANK", -1)) != -1  # one of several processes (accelerate, torchrun)
        # Launched as several processes without a GPU (`accelerate launch --multi_gpu` on a CPU machine):
        # Accelerate forms a gloo process group only when told to run on the CPU.
        distributed_on_cpu = launched and not torch.cuda.is_available()
        # Accelerate keeps one process-wide state and refuses a second run (a notebook, a test) with another
        # mixed precision; forget the previous run's settings. In a single process, forget the device too: an
        # earlier `Accelerator(cpu=True)` (or a Trainer's `use_cpu`) would keep this run off the GPU. Launched
        # processes keep their layout: re-forming a gloo group for a second run in them sometimes hung.
        from accelerate.state import AcceleratorState

        grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
        AcceleratorState._reset_state(reset_partial_state=not (launched or grouped))
        self.accelerator = Accelerator(
            cpu=distributed_on_cpu,
            mixed_precision=config.mixed_precision,
            log_with=tracker,
            project_dir=str(self.output_dir) if tracker else None,
            step_scheduler_with_optimizer=False,
        )
        launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` asked
        if config.mixed_precision is None:  # unset: what `accelerate launch --config_file ...` asked for, else "no"
            self.config = config = dataclasses.replace(config, mixed_precision=self.accelerator.mixed_precision)
        elif launcher_precision not in ("no", config.mixed_precision) and self.accelerator.is_main_process:
            logger.warning("accelerate launch asked for %s mixed precision; the recipe's mixed_precision %r wins. "
                           "Leave mixed_precision unset in the recipe (or pass --mixed_precision) to choose.",
                           launcher_precision, config.mixed_precision)
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and not _is_fsdp(self.accelerator) \
                and self.accelerator.is_main_process:
            logger.warning("The accelerate config asks for FSDP, which Accelerate sets up for several processes on "
                           "accelerators (GPUs) only: this run goes without it (distributed type %s, %d process(es)), "
                           "each process holding the whole model.", self.accelerator.distributed_type.value,
                           self.accelerator.num_processes)
        self.is_main = self.accelerator.is_main_process
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.tracker = tracker
        # Every rank seeds differently (different dropout masks); initial weights come from rank 0 via DDP.
        set_seed(config.seed, device_specific=True)

        if self.is_main:
            ckpt.probe_writable(self.output_dir)
            ckpt.lock_output_dir(self.output_dir)
            ckpt.restore_interrupted_replacements(self.output_dir)
        self.accelerator.wait_for_everyone()
        self.log = JsonlLog(self.output_dir / LOG_FILE_NAME, enabled=self.is_main)
        self.resume_dir = ckpt.resolve_resume_checkpoint(config.resume_from_checkpoint, self.output_dir)
        if self.resume_dir is not None:
            check_own_checkpoint(self.resume_dir)
            check_same_data(self.resume_dir, config)
        self._check_fresh_start()
        if self.is_main:  # only once the folder is known to be this run's (or one it may replace)
            for stale in ckpt.remove_stale_staging(self.output_dir):
                logger.warning("Removed %s, left by a run that stopped while writing it.", stale)
        self.accelerator.wait_for_everyone()

    def _check_fresh_start(self):
        """A new run must not mix its checkpoints with an older run's (resume would pick the wrong ones)."""
        existing = ckpt.list_checkpoints(self.output_dir)
        self.replaced_checkpoints = []
        if self.resume_dir is not None:
            self._check_no_later_checkpoints(existing)
            return
        if not existing:
            # The final save writes many names (weights, config, tokenizer files, code, plots, results): a fresh run
            # wants a folder with nothing else in it. A run killed before its first checkpoint leaves its tokenizer,
            # log and TensorBoard folder, which `latest` starts again from.
            ours = {ckpt.LOCK_NAME}
            if self.config.resume_from_checkpoint == "latest":
                ours |= {TOKENIZER_DIR_NAME, LOG_FILE_NAME, TRACKER_RUN_NAME}
            # (lexists: the main process may be removing a stale entry while another lists the folder.)
            held = sorted(entry.name for entry in self.output_dir.iterdir() if entry.name not in ours
                          and not ckpt.is_stale_staging(entry) and os.path.lexists(entry))
            if held and not self.config.overwrite_output_dir:
                killed_early = set(held) <= {TOKENIZER_DIR_NAME, LOG_FILE_NAME, TRACKER_RUN_NAME}
                raise ValueError(
                    f"Output directory {str(self.output_dir)!r} is not empty ({', '.join(held[:6])}"
                    f"{', ...' if len(held) > 6 else ''}): the run would overwrite a saved model or your files there. "
                    + ("These are what a run stopped before its first checkpoint leaves: pass "
                       "--resume_from_checkpoint latest to start it again there. " if killed_early else "")
                    + "Choose another (or a new) --output_dir, or pass --overwrite_output_dir to let the run write "
                    "over them."
                )
            return
        if not self.config.overwrite_output_dir and self.config.resume_from_checkpoint == "latest":
            raise ValueError(
                f"Output directory {str(self.output_dir)!r} holds checkpoint folders ({existing[-1][1].name}, ...), but "
                "none is complete (see the warnings above), so --resume_from_checkpoint latest has nothing to resume. "
                "Pass --overwrite_output_dir to delete them and start again, or choose another --output_dir."
            )
        if not self.config.overwrite_output_dir:
            raise ValueError(
                f"Output directory {str(self.output_dir)!r} already holds checkpoints ({existing[-1][1].name}, ...). "
                "Pass --resume_from_checkpoint latest to continue that run, --overwrite_output_dir to delete them and "
                "start again, or choose another --output_dir."
            )
        self.replaced_checkpoints = [path for _, path in existing]  # deleted once the data has been read

    def replace_earlier_run(self):
        """A fresh run, once its first step has been taken (its data, tokenizer, model and batches all work): only now
        do an earlier run's log, tokenizer and, with --overwrite_output_dir, checkpoints go. A mistake that shows
        before then (a mistyped path, a tokenizer without the special tokens, an accumulation larger than the data)
        costs them nothing, and leaves nothing in the way of the corrected run."""
        self.earlier_run_pending = False
        self.accelerator.wait_for_everyone()
        if self.is_main:
            # The earlier checkpoints first, each renamed out of the way at once (a kill then leaves no half-deleted
            # checkpoint under its name, nor one that `latest` would resume); the log last, so that a kill before
            # it leaves the earlier run's log with no checkpoint of that run beside it.
            trashed = ckpt.set_aside(self.replaced_checkpoints)
            staged = self.output_dir / TOKENIZER_STAGING_NAME
            if staged.is_dir():
                ckpt.replace_dir(staged, self.output_dir / TOKENIZER_DIR_NAME)
            self.log.truncate_after(-1)
            for path in trashed:
                shutil.rmtree(path, ignore_errors=True)
            if trashed:
                self.print(f"Deleted {len(trashed)} checkpoints of an earlier run in {self.output_dir} "
                           "(--overwrite_output_dir).")
        self.replaced_checkpoints = []
        self.accelerator.wait_for_everyone()

    def _check_no_later_checkpoints(self, existing):
        """Resuming from an earlier checkpoint of this output directory would overwrite its later ones, and a later
        `--resume_from_checkpoint latest` would pick those up again: refuse, and touch nothing."""
        state = ckpt.read_json_object(self.resume_dir / ckpt.TRAINER_STATE_NAME, "this training loop's state",
                                      ckpt.CheckpointError)
        if existing and self.resume_dir.resolve().parent != self.output_dir.resolve():
            raise ValueError(
                f"Resuming from {str(self.resume_dir)!r}, outside --output_dir {str(self.output_dir)!r}, which holds "
                f"checkpoints of another run ({', '.join(path.name for _, path in existing[:4])}"
                f"{', ...' if len(existing) > 4 else ''}): rotation and checkpoint averaging would mix the two runs. "
                "Choose an --output_dir without checkpoints."
            )
        later = [path for step, path in existing if step > state["step"] and path.resolve() != self.resume_dir.resolve()
                 and ckpt.verify_checkpoint(path) is None]  # hashes too: `latest` skipped a corrupted one
        if later:
            raise ValueError(
                f"Resuming from {str(self.resume_dir)!r} (step {state['step']}), but {str(self.output_dir)!r} holds later "
                f"complete checkpoints ({', '.join(path.name for path in later)}): the resumed run would overwrite "
                "them, and a later --resume_from_checkpoint latest would continue from them. Move them out of the "
                "output directory first, or resume from latest."
            )

    def print(self, *args):
        self.accelerator.print(*args)

    # -- setup ---------------------------------------------------------------------------------------------

    def setup_tokenizer(self, raw):
        from .presets import load_preset
        from .tokenization import load_tokenizer, save_tokenizer, train_tokenizer

        if self.resume_dir is not None:
            return self.resumed_tokenizer()
        # The tokenizer's maximum length is the model's, as transformers ties them (what `truncation=True` cuts at).
        positions = load_preset(model_preset(self.config), **self.config.model_overrides).max_position_embeddings
        if self.config.tokenizer:
            tokenizer = load_tokenizer(str(resolve_path(self.config.tokenizer)))
            check_special_tokens(tokenizer, f"tokenizer {self.config.tokenizer}", ("pad_token", "bos_token", "eos_token"),
                                 "use a tokenizer from scripts/train_tokenizer.py")
            tokenizer.model_max_length = positions  # train_tokenizer.py's default is 1024, whatever the model
            return tokenizer
        # Saved under a staging name, renamed to tokenizer/ by `replace_earlier_run` once the first step has been
        # taken: a run that stops before leaves nothing that the corrected run would have to be told to overwrite.
        staged = self.output_dir / TOKENIZER_STAGING_NAME
        if self.is_main:
            texts = list(raw["train"]["source"]) + list(raw["train"]["target"])
            self.print(f"Training a shared BPE tokenizer (vocab {self.config.vocab_size}) on {len(texts)} training sentences.")
            tokenizer = train_tokenizer(texts, vocab_size=self.config.vocab_size, model_max_length=positions)
            shutil.rmtree(staged, ignore_errors=True)
            save_tokenizer(tokenizer, str(staged))
        self.accelerator.wait_for_everyone()
        # Every process reads the same files, so all agree on the vocabulary.
        return load_tokenizer(str(staged))

    def resumed_tokenizer(self):
        """The checkpoint's own tokenizer: its ids are the ones the weights learned. A --tokenizer given on resume
        must be the same vocabulary (another one of the same size would train on silently renumbered text); a
        --vocab_size other than the run's is ignored, with a word."""
        from .tokenization import load_tokenizer

        tokenizer = load_tokenizer(str(self.resume_dir))
        saved = ckpt.read_json_object(self.resume_dir / ckpt.TRAINER_STATE_NAME, "this training loop's state",
                                      ckpt.CheckpointError).get("config") or {}
        if self.config.tokenizer:
            given = load_tokenizer(str(resolve_path(self.config.tokenizer)))
            if given.get_vocab() != tokenizer.get_vocab():
                sizes = f"{len(given)} tokens against {len(tokenizer)}" if len(given) != len(tokenizer) else \
                    f"{len(tokenizer)} tokens each, numbered differently"
                raise ckpt.CheckpointError(
                    f"--tokenizer {self.config.tokenizer} is not the tokenizer {self.resume_dir} was trained with (their "
                    f"vocabularies differ: {sizes}). Resume without --tokenizer (the checkpoint's own is used), or "
                    "with the one the run was started with.")
        elif saved.get("tokenizer") is None and saved.get("vocab_size", self.config.vocab_size) != self.config.vocab_size:
            logger.warning("Resuming %s with --vocab_size %s: ignored, the run goes on with the tokenizer it trained "
                           "(%s tokens).", self.resume_dir, self.config.vocab_size, len(tokenizer))
        return tokenizer

    def setup_data(self, raw, tokenizer):
        from .data import Seq2SeqCollator, tokenize_pairs

        config = self.config
        self.collator = Seq2SeqCollator(pad_token_id=tokenizer.pad_token_id)
        with self.accelerator.main_process_first():
            self.train_set, filtered = tokenize_pairs(raw["train"], tokenizer, config.max_source_length, config.max_target_length)
        if filtered:
            self.print(f"Filtered {filtered} training pairs longer than {config.max_source_length}/{config.max_target_length} tokens.")
        if len(self.train_set) == 0:
            raise ValueError(
                f"No training pairs left: {filtered} of the {len(raw['train'])} read are longer than max_source_length="
                f"{config.max_source_length} or max_target_length={config.max_target_length} tokens (raise them, or "
                f"max_train_samples={config.max_train_samples})." if filtered else "The training data holds no pairs."
            )
        self.validation_raw = raw["validation"] if "validation" in raw else None
        self.test_raw = raw["test"] if "test" in raw else None
        self.validation_set = None
        if self.validation_raw is None or len(self.validation_raw) == 0:
            self.print("No validation split: training without validation" + (
                f"; the average of the last {config.average_checkpoints} checkpoints is the final model unvalidated"
                if config.average_checkpoints > 1 else "") + ".")
        else:
            # Validation keeps every pair, however long: filtering it would flatter the scores.
            with self.accelerator.main_process_first():
                self.validation_set, _ = tokenize_pairs(self.validation_raw, tokenizer, 10**6, 10**6)
            lengths = zip(map(len, self.validation_set["input_ids"]), map(len, self.validation_set["labels"]))
            long = [(i, n + m) for i, (n, m) in enumerate(lengths)
                    if n > config.max_source_length or m > config.max_target_length]
            if long and self.is_main:
                first = ", ".join(f"pair {i + 1} ({self.validation_raw[i]['source'][:30]!r}..., {tokens} tokens)"
                                  for i, tokens in long[:3])
                logger.warning("%d validation pair(s) longer than max_source_length=%d or max_target_length=%d tokens "
                               "are kept (leaving them out would flatter the scores), and each validation loss takes "
                               "them whole: %s%s", len(long), config.max_source_length, config.max_target_length,
                               first, " ..." if len(long) > 3 else "")

    def make_sampler(self):
        from .data import TokenBatchSampler, token_lengths

        digest = hashlib.sha256()
        source_lengths, target_lengths = token_lengths(self.train_set, digest)
        self.train_data_sha256 = digest.hexdigest()  # checked on resume: the same count of pairs is not the same data
        return TokenBatchSampler(
            source_lengths,
            target_lengths,
            max_tokens=self.config.max_tokens,
            shuffle=True,
            seed=self.config.seed,
            num_replicas=self.world_size,
            rank=self.rank,
            # Whole updates per epoch, and the same global batch order for any split of one update into
            # processes x micro-batches (1 process x 2 micro-batches == 2 processes x 1).
            batch_count_multiple=self.world_size * self.config.gradient_accumulation_steps,
        )

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save_checkpoint(self):
        """Write `checkpoint-<step>` atomically (every rank adds its RNG state), then apply keep-last-K."""
        accelerator = self.accelerator
        step = self.step
        state_dict = _state_dict_for_saving(accelerator, self.model)
        optimizer_state = optimizer_state_for_saving(accelerator, self.model, self.optimizer)
        json_rng, tensor_rng = capture_rng_state()
        trainer_state = {
            "version": TRAINER_STATE_VERSION,
            "step": step,
            "sampler": self.sampler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "consecutive_bad_steps": self.consecutive_bad_steps,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_before + time.monotonic() - self.start_time,
            "world_size": self.world_size,
            "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "config": self.config.to_dict(),
            "train_data_sha256": self.train_data_sha256,
            "log_records": self.log.records,
            "last_eval_step": self.last_eval_step,
            "log_window": self.log_window.state_dict(),
        }

        def write_main(staging: Path):
            unwrapped = accelerator.unwrap_model(self.model)
            unwrapped.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
            save_tokenizer(self.tokenizer, staging)
            ckpt.save_torch_state(optimizer_state, staging / OPTIMIZER_NAME)
            ckpt.save_torch_state(self.scheduler.state_dict(), staging / SCHEDULER_NAME)
            (staging / ckpt.TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=2, sort_keys=True), encoding="utf-8")

        def write_rank(staging: Path):
            (staging / f"rng_state_{self.rank}.json").write_text(json.dumps(json_rng), encoding="utf-8")
            ckpt.save_torch_state(tensor_rng, staging / f"rng_state_{self.rank}.pt")

        if self.world_size == 1:
            def write_all(staging):
                write_main(staging)
                write_rank(staging)

            path = ckpt.write_checkpoint(self.output_dir, step, write_all)
        else:
            path = self._save_distributed(step, write_main, write_rank)
        self.last_saved_step = step
        self.rotate_checkpoints(path)
        return path

    def rotate_checkpoints(self, newest: Path) -> None:
        """Delete the oldest checkpoints beyond `save_total_limit` (never `newest`), on the main process."""
        if self.is_main:
            for deleted in ckpt.rotate_checkpoints(self.output_dir, self.config.save_total_limit, protect=[newest],
                                                   superseded=self.earlier_runs_last):
                logger.info("Deleted old checkpoint %s (save_total_limit=%s).", deleted, self.config.save_total_limit)
        self.accelerator.wait_for_everyone()

    def _save_distributed(self, step, write_main, write_rank) -> Path:
        accelerator = self.accelerator
        final = ckpt.checkpoint_path(self.output_dir, step)
        staging = ckpt.staging_dir_path(self.output_dir, step)
        if self.is_main:
            ckpt.create_staging_dir(self.output_dir, step)
        accelerator.wait_for_everyone()
        error = None
        try:
            if self.is_main:
                write_main(staging)
            write_rank(staging)
        except Exception as caught:  # every rank must learn of a failure, or the others wait forever
            error = caught
        except BaseException:  # stopped (Ctrl-C, SIGTERM): the half-written folder is not left behind
            if self.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        failures = accelerator.reduce(torch.tensor([0 if error is None else 1], device=accelerator.device), "sum")
        if int(failures.item()):
            full = ckpt.disk_full_note(error, staging) if error is not None else ""
            if self.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            raise ckpt.CheckpointError(f"Could not write checkpoint {str(final)!r}: {error or 'failed on another process'}"
                                       f"{full}.")
        if self.is_main:
            ckpt.commit_staging_dir(staging, final, step)
        accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, folder: Path):
        """Restore weights, optimizer, scheduler, data position and RNG of a verified checkpoint."""
        state = ckpt.read_json_object(folder / ckpt.TRAINER_STATE_NAME, "this training loop's state", ckpt.CheckpointError)
        if (saved := state.get("world_size", 1)) != self.world_size:
            raise ckpt.CheckpointError(
                f"{folder} was written by {saved} process{'' if saved == 1 else 'es'}; resuming with {self.world_size} would "
                "change the data order or the random streams (each process keeps its own). Resume with the same "
                "number of processes."
            )
        if state.get("train_data_sha256", self.train_data_sha256) != self.train_data_sha256:
            sampler = state.get("sampler")
            saved_count = sampler.get("num_examples") if isinstance(sampler, dict) else None
            how = ("their text or order differs" if saved_count == len(self.train_set) else
                   f"{saved_count} pairs there, {len(self.train_set)} now: the file, the filters or max_train_samples")
            raise ckpt.CheckpointError(
                f"{folder} was trained on other data: this run's training pairs, as tokenized, are not the ones it "
                f"trained on ({how}). Resume with the data the run was started with; to go on from its weights on "
                f"other data, fine-tune it: scripts/finetune_trainer.py --model {folder}.")
        model = self.accelerator.unwrap_model(self.model)
        check_same_model(folder, model.config)
        load_full_weights(self.accelerator, self.model, ckpt.load_safetensors_folder(folder), str(folder))
        optimizer_file = folder / OPTIMIZER_NAME
        optimizer_state = ckpt.load_torch_state(optimizer_file)
        if not _is_fsdp(self.accelerator):  # FSDP's full state is keyed by names, and checked by torch
            check_optimizer_state(optimizer_state, self.optimizer, model, optimizer_file)
        configured_optimizer = [{key: group[key] for key in OPTIMIZER_SETTINGS if key in group}
                                for group in self.optimizer.param_groups]
        with restoring(optimizer_file, "the optimizer's state"):
            load_optimizer_state(self.accelerator, self.model, self.optimizer, optimizer_state)
        keep_configured_optimizer(self.optimizer, configured_optimizer, optimizer_file)
        configured = [dict(vars(schedule)) for schedule in self.scheduler.lr_lambdas]
        with restoring(folder / SCHEDULER_NAME, "the learning-rate schedule"):
            self.scheduler.load_state_dict(ckpt.load_torch_state(folder / SCHEDULER_NAME))
            keep_configured_schedule(self.scheduler, configured, folder)
        self.step = state["step"]
        with restoring(folder / ckpt.TRAINER_STATE_NAME, "the data position"):
            self.sampler.load_state_dict(state["sampler"])
        self.skipped_steps, self.consecutive_bad_steps, self.tokens_seen = (state[key] for key in RESUMED_COUNTS)
        self.elapsed_before = state["elapsed_s"]
        self.last_saved_step = self.step
        self.last_eval_step, self.resumed_log_records = state.get("last_eval_step"), state.get("log_records")
        self.log_window = LogWindow.from_state(state.get("log_window"))
        if state.get("grad_scaler") and self.accelerator.scaler is not None:
            with restoring(folder / ckpt.TRAINER_STATE_NAME, "the gradient scaler"):
                self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        rng_json, rng_tensors = folder / f"rng_state_{self.rank}.json", folder / f"rng_state_{self.rank}.pt"
        json_state = ckpt.read_json_object(rng_json, "random-number generator states", ckpt.CheckpointError)
        tensor_state = ckpt.load_torch_state(rng_tensors)
        with restoring(rng_json, "Python's and NumPy's random states"):
            restore_rng_state(json_state=json_state)
        with restoring(rng_tensors, "torch's random states"):
            restore_rng_state(tensor_state=tensor_state)
        self.print(f"Resumed from {folder} at step {self.step} (epoch {self.sampler.epoch}, "
                   f"{state['sampler']['batches_consumed']} batches into it).")

    # -- the loop ------------------------------------------------------------------------------------------

    def micro_batches(self):
        """Endless stream of collated micro-batches in the sampler's order (which resumes where it stopped).

        Batches are collated one at a time as they are consumed, so the sampler's count of yielded batches
        is exactly what has been trained on when a checkpoint is written.
        """
        while True:
            for indices in self.sampler:
                yield collate(self.train_set, indices, self.collator)
            self.sampler.set_epoch(self.sampler.epoch + 1)

    def evaluate(self) -> dict:
        """Validation loss, and BLEU/chrF/exact match of greedy (or beam) translations of a small sample."""
        if self.validation_set is None:
            return {}
        config = self.config
        model = self.accelerator.unwrap_model(self.model)
        with preserved_rng():
            losses = validation_loss(self.model, self.validation_set, self.collator, config.max_tokens)
            count = min(config.eval_max_samples, len(self.validation_raw))
            sources = list(self.validation_raw["source"][:count])
            references = list(self.validation_raw["target"][:count])
            with self.accelerator.autocast(), without_mixed_precision_wrapper(model):
                predictions = translate_texts(model, self.tokenizer, sources, config.eval_batch_size, config.eval_num_beams,
                                              config.length_penalty, config.max_new_tokens_extra, config.max_source_length)
            scores = translation_metrics(predictions, references, effective_order=uses_builtin_task(config),
                                         tokenize=bleu_tokenizer(config.target_lang))
        return {"val_loss": losses["loss"], "val_nll": losses["nll"], "val_ppl": losses["ppl"], "val_bleu": scores["bleu"],
                "val_chrf": scores["chrf"], "val_exact_match": scores["exact_match"]}

    def record_eval(self):
        metrics = self.evaluate()
        if not metrics:
            return metrics
        self.log.write({"type": "eval", "step": self.step, **metrics})
        if self.tracker:
            self.accelerator.log({f"eval/{k[4:]}": v for k, v in metrics.items()}, step=self.step)
        self.print(f"step {self.step}: {validation_summary(metrics)}")
        self.last_eval_step, self.last_eval_metrics = self.step, metrics
        return metrics

    def _out_of_time(self) -> bool:
        if self.config.max_time_minutes is None:
            return False
        over = time.monotonic() - self.start_time >= self.config.max_time_minutes * 60
        if self.world_size > 1:  # all ranks must stop at the same step
            flag = torch.tensor([1 if over else 0], device=self.accelerator.device)
            over = bool(self.accelerator.reduce(flag, "sum").item())
        return over

    def train_step(self, batches) -> dict:
        """One optimizer update over `gradient_accumulation_steps` micro-batches.

        The gradient is that of the mean loss over every target token of the update (all micro-batches and
        processes), so one process with k micro-batches and k processes with one each compute the same update: the
        same to rounding without dropout; with dropout, the same in expectation, as each process draws its own masks.
        """
        accelerator, model = self.accelerator, self.model
        device = accelerator.device
        counts = [batch_token_counts(batch) for batch in batches]
        local = torch.tensor([sum(c[1] for c in counts), sum(c[0] for c in counts)], dtype=torch.float64, device=device)
        total_target, total_source = (accelerator.reduce(local, "sum") if self.world_size > 1 else local).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for index, (batch, (_, target_tokens)) in enumerate(zip(batches, counts)):
            batch = {k: v.to(device) for k, v in batch.items()}
            last = index == len(batches) - 1
            context = accelerator.no_sync(model) if (not last and self.world_size > 1) else contextlib.nullcontext()
            with context:
                with accelerator.autocast():
                    loss = compute_loss(self.step_model, batch)
                # DDP averages gradients over processes, hence the world-size factor.
                weight = target_tokens * self.world_size / total_target
                accelerator.backward(loss * weight)
            loss_sum += loss.detach().to(torch.float64) * target_tokens
        if self.world_size > 1:
            loss_sum = accelerator.reduce(loss_sum, "sum")
        mean_loss = float(loss_sum) / total_target
        # Always measure the gradient norm (max_norm=inf does not clip): a finite loss can still give inf grads.
        grad_norm = gradient_norm(list(model.parameters()), self.config.max_grad_norm, accelerator)
        counts = {"loss": mean_loss, "grad_norm": grad_norm, "target_tokens": total_target, "source_tokens": total_source}
        scaled = accelerator.scaler is not None  # fp16: the loss scaler skips steps with non-finite gradients itself
        if not math.isfinite(mean_loss) or (not math.isfinite(grad_norm) and not scaled):
            # A non-finite update must not touch the weights, the optimizer moments or the schedule.
            self.optimizer.zero_grad(set_to_none=True)
            if scaled:  # `gradient_norm` unscaled the gradients: only `update` lets the next step unscale again
                scaler = accelerator.scaler  # (GradScaler raises otherwise). It backs off as on an overflow, which
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())  # also restarts the count of good
                if isinstance(getattr(scaler, "_growth_tracker", None), torch.Tensor):  # steps before it grows again
                    scaler._growth_tracker.zero_()
            self.skipped_steps += 1
            self.consecutive_bad_steps += 1
            return {**counts, "status": "bad"}
        counts["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this update uses
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if accelerator.optimizer_step_was_skipped:
            # fp16 overflow: the loss scaler skipped the update and lowered its scale; routine, not divergence.
            return {**counts, "status": "overflow"}
        self.scheduler.step()
        self.consecutive_bad_steps = 0
        self.step += 1
        return {**counts, "status": "ok"}

    def train_steps(self, stream, progress) -> str:
        """Update until max_steps, the time budget or divergence (returned as the reason), logging, evaluating and
        saving checkpoints on the way."""
        config, accelerator = self.config, self.accelerator
        window = self.log_window
        window.resume()
        stop_reason = "max_steps"
        while self.step < config.max_steps:
            raise_pending_stop()
            if self._out_of_time():
                stop_reason = "max_time"
                break
            batches = [next(stream) for _ in range(config.gradient_accumulation_steps)]
            result = self.train_step(batches)
            if self.earlier_run_pending:
                self.replace_earlier_run()
            if result["status"] == "overflow":
                continue
            if result["status"] == "bad":
                self.print(f"Non-finite loss/gradient ({result['loss']}) after step {self.step}: update skipped "
                           f"({self.consecutive_bad_steps} in a row, {self.skipped_steps} in total).")
                self.log.write({"type": "skipped", "step": self.step, "loss": _json_number(result["loss"]),
                                "consecutive": self.consecutive_bad_steps, "total_skipped": self.skipped_steps})
                if self.consecutive_bad_steps >= config.max_consecutive_bad_steps:
                    stop_reason = "diverged"
                    break
                continue
            tokens = result["source_tokens"] + result["target_tokens"]
            self.tokens_seen += int(tokens)
            window.add(result["loss"], tokens)
            progress.update(1)
            if self.step % config.logging_steps == 0 or self.step == config.max_steps:
                record = {
                    "type": "train",
                    "step": self.step,
                    "epoch": self.sampler.epoch,
                    "loss": window.loss / window.steps,
                    "lr": result["lr"],
                    "tokens_per_s": window.tokens / window.elapsed(),
                    "elapsed_s": self.elapsed_before + time.monotonic() - self.start_time,
                }
                record["grad_norm"] = result["grad_norm"]
                self.log.write(record)
                if self.tracker:
                    accelerator.log({"train/loss": record["loss"], "train/lr": record["lr"],
                                     "train/tokens_per_s": record["tokens_per_s"]}, step=self.step)
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
                window = self.log_window = LogWindow()
            if config.eval_steps and self.step % config.eval_steps == 0:  # before the save: a resumed run keeps it
                window.pause()  # tokens/s measures training, not evaluation
                self.record_eval()
                window.resume()
            if config.save_steps and self.step % config.save_steps == 0:
                window.pause()
                self.save_checkpoint()
                window.resume()
        window.pause()  # the final save keeps it as it is
        return stop_reason

    def run(self) -> dict:
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator
        raw = load_raw_data(config)
        self.tokenizer = self.setup_tokenizer(raw)
        for option in ("num_beams", "eval_num_beams"):  # as translate.py's check_num_beams, before any training
            if getattr(config, option) > len(self.tokenizer):
                raise ValueError(f"{option} {getattr(config, option)}: more beams than the tokenizer has tokens "
                                 f"({len(self.tokenizer)}).")
        self.setup_data(raw, self.tokenizer)
        self.sampler = self.make_sampler()
        model = build_model(config, self.tokenizer)
        _apply_generation_defaults(model, config)
        optimizer, self.scheduler = make_optimizer_and_scheduler(model, config, model.config.d_model)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.step_model = self.model
        if config.compile and accelerator.state.dynamo_plugin.backend.value != "NO":
            self.print("Accelerate already compiles the model (--dynamo_backend): `compile` adds nothing to it.")
        elif config.compile:
            self.step_model = compiled_for_training(self.model)
            self.print("The training step runs under torch.compile: the first steps compile it (minutes).")
        self.step = 0
        self.skipped_steps = self.consecutive_bad_steps = self.tokens_seen = 0
        self.elapsed_before = 0.0
        self.last_saved_step = self.last_eval_step = self.last_eval_metrics = None
        self.log_window = LogWindow()
        if self.resume_dir is not None:
            self.load_checkpoint(self.resume_dir)
            self.log.truncate_after(self.step, self.resumed_log_records)
            if self.step > config.max_steps:
                final = (f"averages the last {config.average_checkpoints} checkpoints of {self.output_dir} "
                         "(average_checkpoints), as at the end of any run, unless the average validates worse than "
                         "the last" if config.average_checkpoints > 1
                         else f"is the checkpoint's (step {self.step})")
                logger.warning("Resumed at step %d, past max_steps (%d): no step is trained, and the final model %s.",
                               self.step, config.max_steps, final)
        self.earlier_run_pending = self.resume_dir is None
        if self.tracker:
            accelerator.init_trackers(TRACKER_RUN_NAME, config=_tracker_hparams(config))
        n_params = sum(p.numel() for p in accelerator.unwrap_model(self.model).parameters())
        self.print(
            f"Training {n_params / 1e6:.2f}M parameters on {len(self.train_set)} pairs ({data_description(config)}), "
            f"{self.world_size} process(es) ({accelerator.distributed_type.value}, {accelerator.device}), up to {config.max_steps} steps of {config.gradient_accumulation_steps} x "
            f"{config.max_tokens} tokens per process."
        )
        if config.max_steps < config.warmup_steps and self.is_main:
            logger.warning("max_steps (%d) ends before the warm-up (warmup_steps %d): the learning rate never reaches "
                           "its peak (%.2e at the last step). Lower warmup_steps for a short run (the tiny recipe, "
                           "configs/train-tiny.yaml, has 300).", config.max_steps, config.warmup_steps,
                           self.scheduler.lr_lambdas[0](config.max_steps - 1))  # the last update's (the lr is 1)

        self.model.train()
        stream = self.micro_batches()
        # Closed however the loop ends, so that a message on Ctrl-C starts on a line of its own.
        with tqdm(total=config.max_steps, initial=self.step, disable=not accelerator.is_local_main_process,
                  desc="training", dynamic_ncols=True) as progress:
            stop_reason = self.train_steps(stream, progress)
        if self.earlier_run_pending:  # out of time before the first step
            self.replace_earlier_run()

        if stop_reason == "diverged":
            last = ckpt.find_latest_checkpoint(self.output_dir, check_hashes=False) if self.is_main else None
            message = (f"Training stopped: {self.consecutive_bad_steps} consecutive steps with a non-finite loss or gradient "
                       f"(max_consecutive_bad_steps={config.max_consecutive_bad_steps}) after step {self.step}. "
                       f"The last good checkpoint is {last or 'none (no checkpoint was written)'}.")
            self.log.write({"type": "end", "step": self.step, "reason": stop_reason})
            accelerator.end_training()
            raise TrainingDiverged(message)
        if stop_reason == "max_time":
            self.print(f"Wall-clock budget of {config.max_time_minutes} minutes reached at step {self.step}: stopping.")
        return self.finish(stop_reason)

    # -- the end -------------------------------------------------------------------------------------------

    def earlier_runs_last(self, saved: int) -> bool:
        """Whether the checkpoint of step `saved` is an earlier run's last one (finished, or out of time), saved off
        the `save_steps` schedule it was written under and before this step: a run never interrupted would not have
        it. (Judged by this run's --save_steps, a resume with another one deleted the earlier run's scheduled
        checkpoints and left them out of the average.)"""
        if saved >= self.step:
            return False
        recorded, _ = ckpt.recorded_run(ckpt.checkpoint_path(self.output_dir, saved))
        save_steps = recorded.get("save_steps", self.config.save_steps)
        if not isinstance(save_steps, int) or isinstance(save_steps, bool):
            save_steps = self.config.save_steps
        return not save_steps or saved % save_steps != 0

    def finish(self, stop_reason: str) -> dict:
        config, accelerator = self.config, self.accelerator
        # Evaluated before the checkpoint is saved, as in the loop: a run resumed from it keeps this validation.
        if self.last_eval_step != self.step:
            self.record_eval()
        if self.last_saved_step != self.step:
            self.save_checkpoint()
        else:  # resumed from this step's checkpoint: a run killed between saving and rotating left one too many
            self.rotate_checkpoints(ckpt.checkpoint_path(self.output_dir, self.step))
        averaged_from, rejected = [], []
        if config.average_checkpoints > 1:
            # This step's validation (again, if it ran before a resume: its numbers are in the log only).
            last = self.last_eval_metrics if self.last_eval_metrics is not None else self.evaluate()
            averaged_from = ckpt.last_checkpoints(self.output_dir, config.average_checkpoints,
                                                  skip=self.earlier_runs_last)
            ckpt.check_same_architecture(averaged_from)
            weights = ckpt.average_state_dicts([ckpt.load_safetensors_folder(path) for path in averaged_from], averaged_from)
            load_full_weights(accelerator, self.model, weights, "averaged checkpoints")
            self.print(f"Averaged the weights of {len(averaged_from)} checkpoints: {', '.join(p.name for p in averaged_from)}.")
            if len(averaged_from) < config.average_checkpoints:
                self.print(f"(asked for {config.average_checkpoints}; only {len(averaged_from)} complete ones exist)")
            metrics = self.evaluate()
            if metrics:
                self.log.write({"type": "eval", "step": self.step, "averaged": True, **metrics})
                self.print(f"averaged: {validation_summary(metrics)}")
            # The paper averages checkpoints of a converged model; the average of a short run's (the warm-up's peak
            # among them) can be far worse than its last: worse in loss and in BLEU or chrF, better in neither, it is
            # not the model saved and tested. On a tie the paper's average stays (the built-in task's 100s), unless
            # nothing is translated right yet (0s), where the loss is all there is to go by.
            scores = ("val_bleu", "val_chrf")
            if (metrics and last and metrics["val_loss"] > last["val_loss"] and all(metrics[k] <= last[k] for k in scores)
                    and (any(metrics[k] < last[k] for k in scores) or not any(last[k] for k in scores))):
                final = ckpt.checkpoint_path(self.output_dir, self.step)
                load_full_weights(accelerator, self.model, ckpt.load_safetensors_folder(final), str(final))
                if self.is_main:
                    logger.warning("The average of the last %d checkpoints validates worse than %s (val_loss %.4f against "
                                   "%.4f, val_bleu %.2f against %.2f, val_chrf %.2f against %.2f): the final model is "
                                   "%s's weights, not the average (scripts/average_checkpoints.py writes it).",
                                   len(averaged_from), final.name, metrics["val_loss"], last["val_loss"], metrics["val_bleu"],
                                   last["val_bleu"], metrics["val_chrf"], last["val_chrf"], final.name)
                averaged_from, rejected = [], averaged_from
        self.save_final_model()
        results = self.test(stop_reason, [str(p) for p in averaged_from], [str(p) for p in rejected])
        if self.is_main and config.plot:
            plot_training_curves(self.output_dir / LOG_FILE_NAME, self.output_dir / CURVES_FILE_NAME)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return results

    def save_final_model(self) -> None:
        """`save_pretrained` of model, tokenizer and generation config into output_dir, file by file atomically."""
        accelerator = self.accelerator
        state_dict = _state_dict_for_saving(accelerator, self.model)
        if self.is_main:
            unwrapped = accelerator.unwrap_model(self.model)
            staging = self.output_dir / f"{ckpt.TMP_PREFIX}final-model"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                unwrapped.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
                save_tokenizer(self.tokenizer, staging)
                ckpt.seal_folder(staging)
                # An earlier model's config.json (what makes a folder a model) and results go first, config.json comes
                # last: a kill while the files move in leaves a folder that loads as no model (resuming saves it
                # again), never new weights under the old config.
                for earlier in ("config.json", EVAL_RESULTS_NAME):
                    (self.output_dir / earlier).unlink(missing_ok=True)
                ckpt.fsync_dir(self.output_dir)
                files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name == "config.json", p.name))
                for source in files:
                    if source.is_file():
                        target = self.output_dir / source.relative_to(staging)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(source, target)
                ckpt.fsync_dir(self.output_dir)
            except OSError as error:
                raise ckpt.CheckpointError(f"Could not save the final model into {str(self.output_dir)!r}: {error}") from error
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self.print(f"Saved model, tokenizer and generation config to {self.output_dir}.")
        accelerator.wait_for_everyone()

    def test(self, stop_reason: str, averaged_from: list[str], average_rejected: list[str]) -> dict:
        """Translate the test split with the saved generation defaults; write eval_results.json and print samples."""
        config = self.config
        results = {
            "step": self.step,
            "stop_reason": stop_reason,
            "skipped_steps": self.skipped_steps,
            "train_time_s": round(self.elapsed_before + time.monotonic() - self.start_time, 1),
            **data_record(config.dataset_name, config.dataset_config_name, config.train_file),
            **({"test_file": str(config.test_file)} if config.test_file else {}),  # else a split of "dataset"
            "source_lang": config.source_lang,
            "target_lang": config.target_lang,
            "num_beams": config.num_beams,
            # A batch's output limit is its longest source + max_new_tokens_extra: evaluate.py takes both.
            "eval_batch_size": config.eval_batch_size, "max_new_tokens_extra": config.max_new_tokens_extra,
            "averaged_checkpoints": averaged_from,
            **({"average_rejected": average_rejected} if average_rejected else {}),  # validated worse than the last
            "training_config": {**{name: getattr(config, name) for name in RECIPE_FIELDS}, "processes": self.world_size},
        }
        if self.test_raw is None or len(self.test_raw) == 0:
            self.print("No test split: skipping the test evaluation.")
        else:
            # Every process translates (the same sentences): with sharded weights (FSDP) all must take part.
            count = len(self.test_raw) if config.test_max_samples is None else min(config.test_max_samples, len(self.test_raw))
            sources = list(self.test_raw["source"][:count])
            references = list(self.test_raw["target"][:count])
            model = self.accelerator.unwrap_model(self.model)
            start = time.monotonic()
            with preserved_rng(), self.accelerator.autocast(), without_mixed_precision_wrapper(model):
                predictions = translate_texts(model, self.tokenizer, sources, config.eval_batch_size, config.num_beams,
                                              config.length_penalty, config.max_new_tokens_extra, config.max_source_length)
            scores = translation_metrics(predictions, references, effective_order=uses_builtin_task(config),
                                         tokenize=bleu_tokenizer(config.target_lang))
            results.update(
                test_bleu=scores["bleu"], test_chrf=scores["chrf"], test_exact_match=scores["exact_match"],
                bleu_signature=scores["bleu_signature"], chrf_signature=scores["chrf_signature"], test_samples=count,
                test_translate_time_s=round(time.monotonic() - start, 2),
            )
            self.log.write({"type": "test", "step": self.step, "test_bleu": scores["bleu"], "test_chrf": scores["chrf"],
                            "test_exact_match": scores["exact_match"]})
            lines = [
                f"Test set ({count} sentences, beam {config.num_beams}): exact match {100 * scores['exact_match']:.2f}%  "
                f"BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}",
                f"  sacrebleu: {scores['bleu_signature']} | {scores['chrf_signature']}",
            ]
            for source, prediction, reference in list(zip(sources, predictions, references))[: config.num_samples_to_print]:
                mark = "ok" if prediction.strip() == reference.strip() else "!="
                lines.append(f"  [{mark}] {source}  ->  {prediction}   (reference: {reference})")
            self.print("\n".join(lines))
        if self.is_main:
            ckpt.atomic_write_json(self.output_dir / EVAL_RESULTS_NAME, results)
        self.accelerator.wait_for_everyone()
        return results


def _json_number(value: float):
    """JSON has no NaN/inf; write them as strings."""
    return value if math.isfinite(value) else str(value)


def plot_training_curves(log_path: Path, image_path: Path) -> Path | None:
    """Training loss, validation loss and validation BLEU against steps, from the JSONL log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the training-curve picture (pip install matplotlib).")
        return None
    records = JsonlLog(Path(log_path), enabled=False).read()
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and not r.get("averaged")]
    if not train:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        left.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
        right.plot([r["step"] for r in evals], [r["val_bleu"] for r in evals], "o-", color="tab:green", label="validation BLEU")
        right.legend()  # only then: matplotlib warns of an empty legend
    left.set_xlabel("step")
    left.set_ylabel("label-smoothed cross-entropy")
    left.legend()
    right.set_xlabel("step")
    right.set_ylabel("BLEU")
    figure.tight_layout()
    picture = io.BytesIO()
    figure.savefig(picture, dpi=110, format="png")
    plt.close(figure)
    ckpt.atomic_write_bytes(image_path, picture.getvalue())
    return Path(image_path)


@contextlib.contextmanager
def without_mixed_precision_wrapper(model):
    """Accelerate's mixed precision replaces `model.forward` with an autocast wrapper, and `generate` leaves a model
    whose `forward` was replaced to transformers' loop (someone may be watching its calls). Translations during
    training run under `accelerator.autocast()` already: the class's `forward`, and the fast search, do the same."""
    wrapper = vars(model).get("forward") if "_original_forward" in vars(model) else None
    if wrapper is None:
        yield
        return
    del model.forward
    try:
        yield
    finally:
        model.forward = wrapper


def train(config: TrainingConfig) -> dict:
    """Run a training described by `config`; returns the test metrics (also in eval_results.json)."""
    try:
        return Trainer(config).run()
    finally:
        ckpt.unlock_output_dir(config.output_dir)


class Terminated(BaseException):
    """SIGTERM (a job scheduler's or `kill`'s polite stop) during training, raised where Python was when it came.
    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


_pending_stop: list[type[BaseException]] = []  # the stop signals' exceptions raised since training began


def raise_pending_stop() -> None:
    """Raise again a stop that a signal already raised once: an exception raised inside a `__del__`, a weakref
    callback or a library's catch-all is printed or dropped there, and the run would go on. Called at every step."""
    if _pending_stop:
        raise _pending_stop[0]()


@contextlib.contextmanager
def stop_signals_raise():
    """While training runs, SIGTERM raises `Terminated` and Ctrl-C `KeyboardInterrupt` where Python is, so that the
    run can say which checkpoint to resume from; each is also remembered for `raise_pending_stop`. Only in the main
    thread (where Python runs signal handlers); Ctrl-C only where Python's own handler is in place (not where it is
    ignored, as in a background job, nor where the caller installed one)."""

    def handler(exception):
        def stop(signum, frame):
            _pending_stop.append(exception)
            raise exception()
        return stop

    wanted = {signal.SIGTERM: Terminated}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        wanted[signal.SIGINT] = KeyboardInterrupt
    previous = {}
    _pending_stop.clear()
    try:
        for signum, exception in wanted.items():
            previous[signum] = signal.signal(signum, handler(exception))
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)
        _pending_stop.clear()


def stoppable(main=None, *, outputs: str = "no output is left half-written (an earlier one is as it was, or complete "
                                          "if the new one was already in place)"):
    """A script's `main` that SIGTERM and Ctrl-C stop as exceptions, so that its clean-up runs (SIGTERM used to end it
    where it stood, leaving its staging behind), ending with one line (saying what became of the `outputs`) and the
    conventional exit code. `@stoppable`, or `@stoppable(outputs=...)`."""
    if main is None:
        return functools.partial(stoppable, outputs=outputs)

    @functools.wraps(main)
    def run(argv=None):
        try:
            with stop_signals_raise():
                return main(argv)
        except (KeyboardInterrupt, Terminated) as stop:
            interrupted = isinstance(stop, KeyboardInterrupt)
            print(f"{'Interrupted' if interrupted else 'Terminated'}: {outputs}.", file=sys.stderr)
            return 130 if interrupted else 128 + signal.SIGTERM

    return run


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of `scripts/train.py`; returns the process exit code."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("httpx", "datasets", "accelerate", "transformers", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = parse_config(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        with stop_signals_raise():
            train(config)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except (ckpt.CheckpointError, ValueError, OSError) as error:  # OSError: a file system that fails (read-only, ...)
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as stop:  # every checkpoint on disk is complete (written atomically)
        latest = ckpt.find_latest_checkpoint(config.output_dir, check_hashes=False)
        where = (f"the last complete checkpoint is {latest}; continue with --resume_from_checkpoint latest"
                 if latest else "no checkpoint was written yet")
        interrupted = isinstance(stop, KeyboardInterrupt)  # Ctrl-C
        print(f"{'Interrupted' if interrupted else 'Terminated'}: {where}.", file=sys.stderr)
        return 130 if interrupted else 128 + signal.SIGTERM
    return 0


__all__ = [
    "InverseSqrtSchedule",
    "TrainingConfig",
    "TrainingDiverged",
    "bleu_tokenizer",
    "exact_match",
    "inverse_sqrt_lr",
    "keep_freed_memory",
    "load_model_and_tokenizer",
    "load_yaml_config",
    "main",
    "parse_config",
    "plot_training_curves",
    "train",
    "translate_texts",
    "translation_metrics",
]
