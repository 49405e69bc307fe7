"""Assemble the Hugging Face Hub repository of a trained model, and upload it.

`build_hub_folder(model_dir, out_dir)` writes the exact folder that is uploaded:

    README.md                  model card rendered from the top-level `model_card.md` template
    config.json                with `auto_map` (remote code) and `custom_pipelines` (the pipeline task)
    generation_config.json
    model.safetensors          safetensors only; the tied output projection is stored once, as `model.shared.weight`
    tokenizer.json, tokenizer_config.json   (`"tokenizer_class": "PreTrainedTokenizerFast"`: loads on 4.57 and 5.x)
    configuration_seq2seq.py, modeling_seq2seq.py, decoding_seq2seq.py
                               the model code, for `trust_remote_code=True`
    pipeline.py                the `"seq2seq-translation"` pipeline

With it, someone who has plain `transformers` (5.x or 4.57) and not this package runs

    AutoModelForSeq2SeqLM.from_pretrained(repo, trust_remote_code=True)
    AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
    pipeline("seq2seq-translation", model=repo, trust_remote_code=True)

The shipped code is checked before anything is written (`check_shipped_code`): it may import only torch,
transformers, a few computation-only standard-library modules and its sibling shipped files, and may not call
`exec`, `eval`, `compile`, `open`, `__import__` and the like. The folder is built in a temporary directory next to
`out_dir` and renamed into place, so `out_dir` is never left half-written.

`push_folder(folder, repo_id)` uploads it with `huggingface_hub.create_repo` + `upload_folder`; every failure
(offline mode, no token, unreachable endpoint, refused token) becomes a `HubUploadError` with a one-line message.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig

from .checkpointing import (AVERAGED_FROM_NAME, recorded_run, refuse_to_replace_inputs, replace_dir, seal_folder,
                            staging_beside)
from .pipeline import TASK
from .tokenization import load_tokenizer, save_tokenizer

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_TEMPLATE = PACKAGE_DIR.parent / "model_card.md"

# The code files that ship with the weights, and nothing else.
SHIPPED_CODE = ("configuration_seq2seq.py", "decoding_seq2seq.py", "modeling_seq2seq.py", "pipeline.py")
# What the shipped code may import. Anything else (os, sys, subprocess, socket, pathlib, pickle, importlib, ...)
# makes the build fail: code that runs on a stranger's machine with trust_remote_code=True must do only maths.
ALLOWED_IMPORT_ROOTS = frozenset(
    {
        "torch",
        "transformers",
        "__future__",
        "abc",
        "collections",
        "contextlib",
        "contextvars",
        "copy",
        "dataclasses",
        "enum",
        "functools",
        "itertools",
        "math",
        "numbers",
        "operator",
        "types",
        "typing",
        "warnings",
    }
)
ALLOWED_RELATIVE_IMPORTS = frozenset(name[: -len(".py")] for name in SHIPPED_CODE)
# Built-ins that run code or touch files/the terminal; the shipped code may not even name them.
FORBIDDEN_BUILTINS = frozenset(
    {"exec", "eval", "compile", "open", "__import__", "breakpoint", "globals", "__builtins__", "exit", "quit"}
)
# Attribute names that reach the same through a module object (`builtins.open`, `os.system`); `torch.compile`
# stays allowed.
FORBIDDEN_METHODS = frozenset({"exec", "eval", "open", "__import__", "system", "popen", "urlopen"})
# Dotted names (and prefixes) that load files, download or execute: `torch.load` unpickles.
FORBIDDEN_ATTRIBUTES = (
    "torch.load",
    "torch.save",
    "torch.hub",
    "torch.ops.load_library",
    "torch.classes.load_library",
    "torch.utils.cpp_extension",
    "transformers.utils.hub",
    "transformers.dynamic_module_utils",
)
# Names that download when called; the shipped code may not import them from transformers.
FORBIDDEN_IMPORTED_NAMES = frozenset(
    {"hf_hub_download", "snapshot_download", "cached_file", "cached_files", "get_class_from_dynamic_module"}
)

EVAL_METRICS = (  # (key in eval_results.json, metric type, display name)
    ("test_bleu", "bleu", "BLEU"),
    ("test_chrf", "chrf", "chrF"),
    ("test_exact_match", "exact_match", "Exact match"),
)
DEFAULT_TAGS = ("translation", "seq2seq", "transformer", "attention-is-all-you-need", "custom_code")
TRAINING_FILES = ("training_config.json", "train_config.json", "training_config.yaml", "train_config.yaml")


class HubUploadError(RuntimeError):
    """The upload failed; the message is one line meant for the user."""


class UnsafeRemoteCodeError(RuntimeError):
    """The code that would be shipped does something remote code must not do."""


# --------------------------------------------------------------------------------------------------------------
# Shipped code checks


def check_shipped_code(folder: str | os.PathLike) -> list[str]:
    """Check the `.py` files in `folder` (the files `trust_remote_code=True` would run); return their names.

    Raises `UnsafeRemoteCodeError` naming every violation: a file other than `SHIPPED_CODE`, an import outside
    `ALLOWED_IMPORT_ROOTS` or the sibling files, a nested relative import (transformers cannot resolve those), a
    reference to a forbidden built-in (`exec`, `eval`, `open`, ...) or to a loading/downloading function
    (`torch.load`, `torch.hub`, `hf_hub_download`, ...). This is a static check; `tests/test_hub.py` also imports
    the files under an audit hook to see that they open no file, socket or process.
    """
    folder = Path(folder)
    problems = []
    names = sorted(p.name for p in folder.glob("*.py"))
    for name in names:
        if name not in SHIPPED_CODE:
            problems.append(f"{name}: not one of the shipped code files {SHIPPED_CODE}")
            continue
        source = (folder / name).read_text(encoding="utf-8")
        problems += [f"{name}:{line}: {what}" for line, what in _code_violations(source)]
    if problems:
        raise UnsafeRemoteCodeError("unsafe or unexpected remote code: " + "; ".join(problems))
    return names


def _code_violations(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _import_allowed(alias.name):
                    found.append((node.lineno, f"imports {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level != 1 or node.module not in ALLOWED_RELATIVE_IMPORTS:
                    found.append((node.lineno, f"relative import {'.' * node.level}{node.module or ''}"))
            elif not _import_allowed(node.module):
                found.append((node.lineno, f"imports from {node.module}"))
            else:
                for alias in node.names:
                    if alias.name in FORBIDDEN_IMPORTED_NAMES or alias.name in FORBIDDEN_BUILTINS:
                        found.append((node.lineno, f"imports {alias.name} from {node.module}"))
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_BUILTINS:
            found.append((node.lineno, f"uses {node.id}"))
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node) or ""
            if node.attr in FORBIDDEN_METHODS or any(
                dotted == bad or dotted.startswith(bad + ".") for bad in FORBIDDEN_ATTRIBUTES
            ):
                found.append((node.lineno, f"uses {dotted or node.attr}"))
    return found


def _import_allowed(module: str) -> bool:
    if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN_ATTRIBUTES):
        return False
    return module.split(".")[0] in ALLOWED_IMPORT_ROOTS


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


# --------------------------------------------------------------------------------------------------------------
# Building the folder


def build_hub_folder(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    tags: tuple[str, ...] | list[str] = (),
    datasets: list[str] | None = None,
    template: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write the Hub repository folder of the model saved in `model_dir` to `out_dir`; return its file names.

    `model_dir` is what training saved (`save_pretrained` of model, tokenizer and generation config; optionally
    `eval_results.json`, `trainer_state.json` and a training config). `out_dir` must not exist, be empty, or
    `overwrite=True` (it is then replaced as a whole, atomically).
    """
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved model: it has no config.json")
    if model_dir in out_dir.parents:
        raise ValueError(f"the output folder {out_dir} must not be inside the model folder {model_dir}")
    # Replaced as a whole: only an earlier Hub folder (its card and shipped code; any repository has a README.md).
    refuse_to_replace_inputs(out_dir, [model_dir], "--dry_run", ("README.md", "configuration_seq2seq.py"))
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    template = Path(template) if template is not None else DEFAULT_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} not found; pass --template PATH")

    # The same checks as translating with it: type, config, generation config, weights that fit, tokenizer.
    from .training import check_tokenizer_matches, data_record, load_saved_model

    model = load_saved_model(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer_matches(tokenizer, model.config, model_dir)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    eval_results = _read_json(model_dir / "eval_results.json")
    check_eval_results(model_dir / "eval_results.json", eval_results)
    if not (eval_results or {}).get("source_lang"):  # a checkpoint, an average: the language pair its run recorded
        recorded, _ = recorded_run(model_dir)
        pair = {key: recorded[key] for key in ("source_lang", "target_lang") if isinstance(recorded.get(key), str)}
        if len(pair) == 2:
            data = {}
            if "train_file" in recorded:  # train.py's settings: its data too (the card's dataset and examples)
                data = data_record(*(recorded.get(key) for key in ("dataset_name", "dataset_config_name", "train_file")))
            eval_results = {**data, **(eval_results or {}), **pair}
    averaged_from = _read_json(model_dir / AVERAGED_FROM_NAME)  # average_checkpoints.py's output: the card says so
    checkpoints = averaged_from.get("checkpoints") if isinstance(averaged_from, dict) else None
    if isinstance(checkpoints, list) and checkpoints and not (eval_results or {}).get("averaged_checkpoints"):
        steps = [int(match.group(1)) for path in checkpoints
                 if (match := re.fullmatch(r"checkpoint-(\d+)", Path(str(path)).name))]  # listed in any order
        eval_results = {**({"step": max(steps)} if steps else {}), **(eval_results or {}),
                        "averaged_checkpoints": [str(path) for path in checkpoints]}

    # Inference settings: training writes use_cache=False into the config; a shared model should decode fast.
    model.config.use_cache = True
    model.generation_config.use_cache = True
    # `register_for_auto_class` makes save_pretrained write `auto_map` and `custom_pipelines` and copy the code files
    # (and their relative imports) next to the weights. The package registers them at import; repeat here so the
    # folder never lacks them.
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForSeq2SeqLM")

    tmp = staging_beside(out_dir)
    try:
        model.save_pretrained(tmp)  # with the code: the modeling files, and pipeline.py, which they import
        save_tokenizer(tokenizer, tmp)
        _declare_model_inputs(tmp / "tokenizer_config.json")
        check_shipped_code(tmp)
        _check_saved_weights(model, tmp)
        card = render_model_card(
            model,
            tokenizer,
            template=template,
            repo_id=repo_id,
            eval_results=eval_results,
            training=_training_recipe(model_dir, eval_results),
            license=license,
            tags=list(DEFAULT_TAGS) + [t for t in tags if t not in DEFAULT_TAGS],
            datasets=datasets,
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")
        names = sorted(p.name for p in tmp.iterdir())
        unexpected = [p.name for p in tmp.iterdir() if not p.is_file()]
        if unexpected:
            raise RuntimeError(f"the Hub folder should hold only files; found folders {unexpected}")
        seal_folder(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


def _generated_length(generation, max_positions: int) -> str:
    """How long `generate` runs by default, as transformers decides: max_new_tokens, else max_length, else 20 new
    tokens within max_position_embeddings."""
    if generation.max_new_tokens is not None:
        return f"{generation.max_new_tokens} new tokens"
    if generation.max_length is not None:
        return f"{generation.max_length} tokens"
    return f"{min(20 + 1, max_positions) - 1} new tokens (transformers' default)"


def _declare_model_inputs(path: Path) -> None:
    """Name the tokenizer outputs the model takes. Without it 4.57's `PreTrainedTokenizerFast` also returns
    `token_type_ids`, and `model.generate(**tokenizer(texts, return_tensors="pt"))` fails there."""
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_input_names") != ["input_ids", "attention_mask"]:
        config["model_input_names"] = ["input_ids", "attention_mask"]
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_saved_weights(model, folder: Path) -> None:
    """Every parameter and buffer of `model` must be stored in (or tied to a tensor of) the safetensors file."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if [f.name for f in files] != ["model.safetensors"]:
        raise RuntimeError(f"expected one model.safetensors, found {[f.name for f in files]}")
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise RuntimeError("pickled weight files must not be shipped")
    with safe_open(files[0], framework="pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    tied = _tied_targets(model)
    persistent = model.state_dict()
    for name, tensor in persistent.items():
        source = name if name in stored else tied.get(name)
        if source is None or source not in stored:
            if name.endswith("final_logits_bias") and not tensor.any():
                continue  # a zero buffer the model rebuilds
            raise RuntimeError(f"the saved weights lack {name}")
        if not torch.equal(stored[source].to(tensor.dtype), tensor.detach().cpu()):
            raise RuntimeError(f"the saved {source} differs from the model's {name}")


def _tied_targets(model) -> dict:
    """{tied parameter: the parameter it shares its tensor with}, e.g. {"lm_head.weight": "model.shared.weight"}."""
    if not getattr(model.config, "tie_word_embeddings", True):
        return {}
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return dict(tied) if isinstance(tied, dict) else {}


def load_reporting_random_weights(model_class, path, **kwargs):
    """`model_class.from_pretrained(path)` from safetensors -> (model, missing, wrong shape, unexpected): the weights
    transformers filled with fresh random values because the files lack them or hold another shape, and those of the
    files it left unused (it only logs either); tied aliases of a loaded tensor do not count as missing. A damaged
    weights file, or weights of other shapes than config.json describes where transformers raises, become a
    ValueError naming `path`."""
    from safetensors import SafetensorError

    try:
        model, loading = model_class.from_pretrained(path, use_safetensors=True, output_loading_info=True, **kwargs)
    except SafetensorError as error:
        raise ValueError(f"{path}: cannot read the weights ({error}); the file is damaged or incomplete.") from error
    except RuntimeError as error:
        if "mismatched" not in str(error) and "size mismatch" not in str(error):
            raise
        raise ValueError(f"{path}: some weights have other shapes than its config.json describes (the load report "
                         "above lists them).") from error
    missing = sorted(set(loading.get("missing_keys", ())) - set(_tied_targets(model)))
    mismatched = [str(item[0]) if isinstance(item, (tuple, list)) else str(item) for item in loading.get("mismatched_keys", ())]
    return model, missing, mismatched, sorted(loading.get("unexpected_keys", ()))


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None where there is no such file."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}.")
    return value


# The fields of eval_results.json that the card shows, and what each must be.
_TEXT_FIELDS = ("source_lang", "target_lang", "dataset", "dataset_name", "dataset_config_name", "dataset_config",
                "train_file", "test_file", "split", "bleu_signature", "chrf_signature", "stop_reason")
_COUNT_FIELDS = ("test_samples", "num_beams", "step")
_NUMBER_FIELDS = (*(key for key, _, _ in EVAL_METRICS), "train_time_s")


def check_eval_results(path: Path, results: dict | None) -> None:
    """A value of the wrong type would reach the card as it is ("(-3 sentences)", metadata `language: - - x`) or
    drop a metric without a word: refused, naming the file and the field. Absent fields and nulls are fine."""
    for key, value in (results or {}).items():
        if value is None:
            continue
        if key in _TEXT_FIELDS and not isinstance(value, str):
            what = "text"
        elif key in _COUNT_FIELDS and not (type(value) is int and value >= 0):
            what = "a whole number, 0 or more"
        elif key in _NUMBER_FIELDS and not (type(value) in (int, float) and math.isfinite(value)):
            what = "a finite number"
        elif key == "averaged_checkpoints" and not isinstance(value, list):
            what = "a list of checkpoint folders"
        else:
            continue
        raise ValueError(f"{path}: {key!r} must be {what}, got {json.dumps(value)[:60]}.")


def _training_recipe(model_dir: Path, eval_results: dict | None) -> dict:
    """What the model dir tells about its training: a training config file, the trainer state and the run summary
    that `scripts/train.py` puts in eval_results.json (steps, time, stop reason, averaged checkpoints)."""
    recipe = {}
    eval_results = eval_results or {}
    sources = [(name, model_dir / name) for name in TRAINING_FILES if (model_dir / name).is_file()]
    for name, path in [*sources, ("eval_results.json", None)]:  # the last: what scripts/train.py records
        if path is None:
            settings = eval_results.get("training_config")
        elif name.endswith(".json"):
            settings = _read_json(path)
        else:
            import yaml

            try:
                settings = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                raise ValueError(f"{path}: not readable as YAML ({error}).") from error
        if isinstance(settings, dict):
            recipe["settings"] = {k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool))}
            recipe["settings_file"] = name
            break
    state = _read_json(model_dir / "trainer_state.json")
    if isinstance(state, dict):  # a Seq2SeqTrainer checkpoint's, or train.py's (its "step")
        for key in ("global_step", "epoch"):
            if state.get(key) is not None:
                recipe[key] = state[key]
        if "global_step" not in recipe and isinstance(state.get("step"), int):
            recipe["global_step"] = state["step"]
    if "global_step" not in recipe and isinstance(eval_results.get("step"), int):
        recipe["global_step"] = eval_results["step"]
    if isinstance(eval_results.get("train_time_s"), (int, float)):
        recipe["train_minutes"] = round(eval_results["train_time_s"] / 60, 1)
    elif isinstance(state, dict) and isinstance(state.get("elapsed_s"), (int, float)):  # a train.py checkpoint
        recipe["train_minutes"] = round(state["elapsed_s"] / 60, 1)
    if isinstance(eval_results.get("stop_reason"), str):
        recipe["stop_reason"] = eval_results["stop_reason"]
    if eval_results.get("averaged_checkpoints"):
        recipe["averaged_checkpoints"] = len(eval_results["averaged_checkpoints"])
    return recipe


LANGUAGE_PAIR = re.compile(r"^[a-z]{2,3}-[a-z]{2,3}$")
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet", ".arrow")  # data files, not Hub ids
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")


def names_a_data_file(name: str) -> bool:
    """Whether `name` ends as a data file's name does (`data/train.jsonl`, `train.parquet`, `TRAIN.CSV.gz`), where a
    Hub dataset id would not."""
    name = name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.endswith(LOCAL_SUFFIXES)
HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _dataset_info(eval_results: dict) -> dict:
    """How to name the training/test data: `display` (for the text), `id` (a Hub dataset id, or None for the built-in
    task and local files), `type` and `config` (for the model-index).

    eval_results.json may say it explicitly (`dataset_name`, `dataset_config_name` for a Hub dataset, `train_file`
    for local files, as `scripts/train.py` writes them); otherwise its `dataset` is "builtin-number-words", a local
    file, or "NAME" / "NAME/CONFIG" of a Hub dataset, told apart by their shape.
    """
    name = eval_results.get("dataset_name")
    config = eval_results.get("dataset_config_name") or eval_results.get("dataset_config")
    description = eval_results.get("dataset")
    local_file = eval_results.get("train_file")
    if name is None and isinstance(description, str) and description and not local_file:
        if description.startswith(("/", ".", "~")) or names_a_data_file(description):
            local_file = description
    if isinstance(local_file, str) and local_file:
        return {"display": f"local data (`{Path(local_file).name}`)", "id": None, "type": Path(local_file).name,
                "config": None}
    if name is None and isinstance(description, str) and description:
        if description.startswith("builtin"):
            return {
                "display": "the built-in English→German number-words task",
                "id": None,
                "type": description,
                "config": None,
            }
        parts = description.split("/")
        if config is None and len(parts) == 3:
            name, config = "/".join(parts[:2]), parts[2]
        elif config is None and len(parts) == 2 and LANGUAGE_PAIR.match(parts[1]):
            name, config = parts
        else:
            name = description
    if not isinstance(name, str) or not name:
        return {"display": None, "id": None, "type": None, "config": None}
    local = (
        not HUB_DATASET_ID.match(name)
        or names_a_data_file(name)
        or Path(name).expanduser().exists()
    )
    if local:
        return {"display": f"local data (`{Path(name).name}`)", "id": None, "type": Path(name).name, "config": None}
    return {"display": f"`{name}`" + (f" ({config})" if config else ""), "id": name, "type": name, "config": config}


# --------------------------------------------------------------------------------------------------------------
# Model card


def render_model_card(
    model,
    tokenizer,
    *,
    template: str | os.PathLike = DEFAULT_TEMPLATE,
    repo_id: str | None = None,
    eval_results: dict | None = None,
    training: dict | None = None,
    license: str = "apache-2.0",
    tags: list[str] | None = None,
    datasets: list[str] | None = None,
) -> str:
    """Fill the model card template; the metadata block (and `model-index`) is made by `huggingface_hub`."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    from jinja2 import TemplateError, TemplateSyntaxError

    eval_results = eval_results or {}
    source_lang, target_lang = eval_results.get("source_lang"), eval_results.get("target_lang")
    # The metadata's `language` takes codes (en, de, zh-Hans, pt_BR); a data column named otherwise ("english") is
    # left out there, and kept in the card's text.
    languages = [lang for lang in (source_lang, target_lang) if lang and re.fullmatch(r"[a-z]{2,3}([-_][A-Za-z0-9]+)*", lang)]
    model_name = repo_id.split("/")[-1] if repo_id else "seq2seq-transformer"
    dataset = _dataset_info(eval_results)
    if datasets is None:
        datasets = [dataset["id"]] if dataset["id"] else []

    metrics = []
    for key, metric_type, display in EVAL_METRICS:
        value = eval_results.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            shown = f"{100 * value:.2f}%" if metric_type == "exact_match" and 0 <= value <= 1 else f"{value:.2f}"
            metrics.append({"type": metric_type, "name": display, "value": round(float(value), 4), "shown": shown})
    # The test set: a file of its own where training was given one (`test_file`), else the dataset's test split.
    test_file = eval_results.get("test_file")
    tested = {"type": Path(test_file).name, "id": None, "config": None} if test_file else dataset
    results = [
        EvalResult(
            task_type="translation",
            task_name=f"Translation {source_lang}-{target_lang}" if languages else "Translation",
            dataset_type=tested["type"] or "unknown",
            dataset_name=tested["id"] or tested["type"] or "unknown",
            dataset_config=tested["config"],
            dataset_split=eval_results.get("split", "test"),
            metric_type=metric["type"],
            metric_name=metric["name"],
            metric_value=metric["value"],
        )
        for metric in metrics
    ]
    card_data = ModelCardData(
        language=languages or None,
        license=license,
        library_name="transformers",
        pipeline_tag="translation",
        tags=tags if tags is not None else list(DEFAULT_TAGS),
        datasets=datasets or None,
        metrics=[m["type"] for m in metrics] or None,
        model_name=model_name,
        eval_results=results or None,
    )
    generation = model.generation_config
    try:
        card = ModelCard.from_template(
            card_data,
            template_path=str(template),
            model_name=model_name,
            repo_id=repo_id or "<user>/<model>",
            task=TASK,
            source_lang=source_lang,
            target_lang=target_lang,
            dataset=dataset["display"],
            test_dataset=f"local data (`{Path(test_file).name}`)" if test_file else None,
            metrics=metrics,
            test_samples=eval_results.get("test_samples"),
            test_num_beams=eval_results.get("num_beams"),
            bleu_signature=eval_results.get("bleu_signature"),
            chrf_signature=eval_results.get("chrf_signature"),
            architecture=_architecture_rows(model, tokenizer),
            post_layer_norm=model.config.layer_norm_position == "post",
            tied_output=bool(model.config.tie_word_embeddings),
            tokenizer_description=_tokenizer_description(model, tokenizer),
            generation={  # what applies: transformers' defaults where the generation config sets nothing
                "num_beams": generation.num_beams or 1,
                "length_penalty": 1.0 if generation.length_penalty is None else generation.length_penalty,
                "max_length": _generated_length(generation, model.config.max_position_embeddings),
            },
            training=training or {},
            example_input=_example_input(source_lang, dataset["type"]),
        )
    except TemplateSyntaxError as error:
        raise ValueError(f"{template}, line {error.lineno}: not a valid model card template ({error.message}).") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{template}: the model card template is not UTF-8 text ({error}).") from error
    except TemplateError as error:
        raise ValueError(f"{template}: the model card template failed to render ({error}).") from error
    return str(card)


def _tokenizer_kind(tokenizer) -> tuple[str, bool]:
    """The tokenizers model behind `tokenizer` (BPE, WordLevel, Unigram, ...) and whether it falls back to bytes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    return (type(model).__name__ if model is not None else type(tokenizer).__name__,
            bool(getattr(model, "byte_fallback", False)))


def _tokenizer_description(model, tokenizer) -> str:
    """The card's sentence on the tokenizer, from the tokenizer and the config (a converted OPUS-MT model's ids and
    kind differ from the package's own)."""
    kind, byte_fallback = _tokenizer_kind(tokenizer)
    text = f"a shared source+target {kind} of {len(tokenizer):,} tokens"
    if byte_fallback:
        text += " with byte fallback (no `<unk>` for unseen characters)"
    specials = [(getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None))
                for name in ("pad", "bos", "eos", "unk")]
    listed = ", ".join(f"`{token}`={index}" for token, index in specials if token is not None and index is not None)
    if listed:
        text += f": {listed}"
    start = model.config.decoder_start_token_id
    if start is not None:
        token = tokenizer.convert_ids_to_tokens(start)
        text += f"; the decoder starts from id {start}" + (f" (`{token}`)" if token is not None else "")
    return text


def _architecture_rows(model, tokenizer=None) -> list[tuple[str, str]]:
    c = model.config

    def per_stack(encoder, decoder):
        return f"{encoder}" if encoder == decoder else f"encoder {encoder}, decoder {decoder}"

    rows = [
        ("Layers (N)", per_stack(c.encoder_layers, c.decoder_layers)),
        ("Model width (d_model)", f"{c.d_model}"),
        ("Feed-forward width (d_ff)", per_stack(c.encoder_ffn_dim, c.decoder_ffn_dim)),
        ("Attention heads (h)", per_stack(c.encoder_attention_heads, c.decoder_attention_heads)),
        ("Dropout (P_drop)", f"{c.dropout}"),
        ("Activation", c.activation_function),
        ("LayerNorm", "post-LN, as in the paper" if c.layer_norm_position == "post" else "pre-LN"),
        ("Positional encoding", f"sinusoidal ({c.positional_encoding_layout} layout)"),
        ("Embeddings", "shared source/target" + (", tied to the output projection" if c.tie_word_embeddings else "")
         + (", scaled by sqrt(d_model)" if c.scale_embedding else "")),
        ("Vocabulary", f"{c.vocab_size:,}" + (f" (shared {_tokenizer_kind(tokenizer)[0]})" if tokenizer is not None else "")),
        ("Max positions precomputed", f"{c.max_position_embeddings}"),
        ("Parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
    ]
    return rows


def _example_input(source_lang: str | None, dataset_type: str | None = None) -> str:
    """A sentence the model can translate, for the card's code samples."""
    if dataset_type and dataset_type.startswith("builtin"):
        return "one thousand, two hundred and five"  # the built-in task knows number words only
    return {
        "en": "The house is small.",
        "de": "Das Haus ist klein.",
        "fr": "La maison est petite.",
    }.get(source_lang or "", "The house is small.")


# --------------------------------------------------------------------------------------------------------------
# Upload


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str = "Upload Seq2SeqTransformer model",
    token: str | None = None,
) -> str:
    """Create `repo_id` (if needed) and upload `folder` to it, as the repository's whole content (files of an earlier
    upload that the folder lacks are deleted in the same commit: a stale `special_tokens_map.json` changed the loaded
    tokenizer; they stay in the history); return the commit URL. Raises `HubUploadError`, also where `private` is
    asked of a repository that exists and is public (`create_repo` leaves an existing one's visibility as it is).
    Without `private`, a new repository gets its owner's default (an organisation's may be private)."""
    import huggingface_hub

    token = check_can_upload(token)
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if private and not api.repo_info(repo_id, repo_type="model").private:
            raise HubUploadError(f"{repo_id} exists and is public: --private does not change an existing repository's "
                                 "visibility, so nothing was uploaded. Make it private on the Hub first, or upload "
                                 "without --private.")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                   repo_type="model", delete_patterns="*")
    except HubUploadError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one readable line
        raise HubUploadError(_describe_upload_error(e, repo_id)) from None
    return str(getattr(commit, "commit_url", commit))


def check_can_upload(token: str | None = None) -> str:
    """Fail fast, before any request, when an upload cannot work: offline mode, or no token. Returns the token."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubUploadError("cannot upload: offline mode is on (HF_HUB_OFFLINE=1); unset it to push to the Hub")
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubUploadError("cannot upload: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    return token


def _describe_upload_error(error: Exception, repo_id: str) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "cannot upload: offline mode is on (HF_HUB_OFFLINE=1); unset it to push to the Hub"
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if status in (401, 403):
            return f"cannot upload to {repo_id}: the Hub refused the token (HTTP {status}); check it has write access"
        return f"cannot upload to {repo_id}: the Hub answered HTTP {status}: {first_line}"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, (OSError, ConnectionError, TimeoutError)) or any(
        word in type(error).__name__ for word in ("Connect", "Timeout", "Network", "Transport")
    ):
        return f"cannot upload: the Hub at {constants.ENDPOINT} is unreachable ({type(error).__name__}: {reason})"
    return f"cannot upload to {repo_id}: {type(error).__name__}: {reason}"


__all__ = [
    "SHIPPED_CODE",
    "HubUploadError",
    "UnsafeRemoteCodeError",
    "build_hub_folder",
    "check_can_upload",
    "check_shipped_code",
    "push_folder",
    "render_model_card",
]
