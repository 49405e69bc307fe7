"""The training loop: recipe, logging, evaluation, checkpoints, resume after crashes, faults, two processes.

Runs use a 1+1-layer, d_model=32 model on 600 pairs of the built-in task, so each takes seconds.
Runs that must die (SIGKILL) or use two processes are subprocesses; the rest run in this process.
"""

import errno
import importlib.util
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_seq2seq import checkpointing as ckpt
from modeling_seq2seq import training
from modeling_seq2seq.training import (
    InverseSqrtSchedule,
    TrainingConfig,
    inverse_sqrt_lr,
    load_yaml_config,
    make_optimizer_and_scheduler,
    parse_config,
)

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "dropout": 0.1,
    "max_position_embeddings": 64,
}
# One thread: these models are tiny (intra-op threads only add synchronisation), and CI's two cores are shared
# by the two processes of the distributed test. Every run on the CPU, as in CI, also on a machine with a GPU: runs
# are compared bit for bit across processes and resumes, and CUDA's kernels and dropout differ from the CPU's (the
# GPU training loop has its own test in test_gpu.py).
CPU_ONLY = {"ACCELERATE_USE_CPU": "true"}
SUBPROCESS_ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                  **CPU_ONLY}


@pytest.fixture(autouse=True, scope="module")
def runs_on_the_cpu():
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CPU_ONLY.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A model preset and a trained tokenizer shared by the runs (BPE training is tested once, in the short run)."""
    from modeling_seq2seq.data import builtin_task
    from modeling_seq2seq.tokenization import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("assets")
    recipe = root / "recipe.yaml"  # empty: the runs use the code's defaults plus their flags, not train-tiny.yaml
    recipe.write_text("{}\n")
    preset = root / "tiny.json"
    preset.write_text(json.dumps(TINY_MODEL))
    train = builtin_task()["train"].select(range(600))
    save_tokenizer(train_tokenizer(list(train["source"]) + list(train["target"]), vocab_size=300), root / "tokenizer")
    return {"preset": str(preset), "tokenizer": str(root / "tokenizer"), "recipe": str(recipe)}


def run_args(assets, output_dir, **overrides):
    """Command-line arguments of a tiny run; keyword arguments replace or add flags."""
    settings = {
        "model_config": assets["preset"],
        "tokenizer": assets["tokenizer"],
        "output_dir": str(output_dir),
        "max_train_samples": 600,
        "max_tokens": 512,
        "max_source_length": 32,
        "max_target_length": 32,
        "max_steps": 12,
        "warmup_steps": 10,
        "lr_scale": 2.0,
        "max_grad_norm": 1.0,
        "logging_steps": 2,
        "eval_steps": 0,
        "eval_max_samples": 16,
        "eval_batch_size": 16,
        "test_max_samples": 16,
        "num_beams": 1,
        "num_samples_to_print": 2,
        "save_steps": 4,
        "save_total_limit": 3,
        "report_to": "none",
        "seed": 0,
    }
    settings.update(overrides)
    args = ["--config", assets["recipe"]] + (["--no-plot"] if "plot" not in settings else [])
    for key, value in settings.items():
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        elif value is not None:
            args += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return args


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def run_subprocess(args, timeout=300, prelude="", env=SUBPROCESS_ENV):
    """Run training.main(args) in a fresh interpreter, after `prelude` (fault-injection patches)."""
    code = f"{prelude}\nimport sys\nfrom modeling_seq2seq import training\nsys.exit(training.main({args!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def read_log(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / training.LOG_FILE_NAME).read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------
# Recipe and configuration (no training)


def test_schedule_matches_the_paper_formula():
    model = torch.nn.Linear(4, 4)
    config = TrainingConfig(warmup_steps=40, lr_scale=2.0)
    optimizer, scheduler = make_optimizer_and_scheduler(model, config, d_model=512)
    assert isinstance(optimizer, torch.optim.Adam)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-9
    seen = []
    for step in range(1, 201):  # the lr used by update `step`
        seen.append(optimizer.param_groups[0]["lr"])
        expected = 2.0 * 512**-0.5 * min(step**-0.5, step * 40**-1.5)
        assert math.isclose(seen[-1], expected, rel_tol=1e-12), step
        optimizer.step()
        scheduler.step()
    assert max(range(200), key=seen.__getitem__) + 1 == 40, "peak at the end of warmup"
    assert math.isclose(inverse_sqrt_lr(4000, 512, 4000), 512**-0.5 * 4000**-0.5)
    # The schedule's settings survive a scheduler state round trip as plain numbers.
    state = scheduler.state_dict()
    assert state["lr_lambdas"][0] == {"d_model": 512, "warmup_steps": 40, "scale": 2.0}
    assert isinstance(InverseSqrtSchedule(512, 40, 2.0)(0), float)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_optimizer_is_fused_and_updates_like_the_default_implementation(weight_decay, monkeypatch):
    config = TrainingConfig(warmup_steps=4, weight_decay=weight_decay)
    torch.manual_seed(0)
    fused_model = torch.nn.Linear(8, 8)
    plain_model = torch.nn.Linear(8, 8)
    plain_model.load_state_dict(fused_model.state_dict())
    fused, fused_schedule = make_optimizer_and_scheduler(fused_model, config, d_model=512)
    assert fused.defaults["fused"] is True
    with monkeypatch.context() as patch:  # a device without fused kernels: torch refuses fused=True
        optimizer_class = type(fused)

        def refuse_fused(params, fused=None, **options):
            if fused:
                raise RuntimeError("`fused=True` requires params of supported devices")
            return optimizer_class(params, **options)

        patch.setattr(torch.optim, optimizer_class.__name__, refuse_fused)
        plain, plain_schedule = make_optimizer_and_scheduler(plain_model, config, d_model=512)
    assert not plain.defaults["fused"]
    for _ in range(5):
        x = torch.randn(4, 8)
        for model, optimizer, schedule in ((fused_model, fused, fused_schedule), (plain_model, plain, plain_schedule)):
            model(x).square().sum().backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("through_accelerate", [False, True])
@pytest.mark.parametrize("max_norm", [None, 0.5, 1e9])
def test_gradient_norm_is_clip_grad_norms_and_clips_only_when_asked(max_norm, through_accelerate):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        model[2].bias.requires_grad_(False)  # a parameter without a gradient
    x = torch.randn(5, 8)
    for model in models:
        (10 * model(x)).square().sum().backward()
    parameters = [list(model.parameters()) for model in models]
    # One process-wide state (the device too): take none from an earlier test, leave none behind.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(cpu=True) if through_accelerate else None
        norm = training.gradient_norm(parameters[0], max_norm, accelerator)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    reference = torch.nn.utils.clip_grad_norm_(parameters[1], max_norm or float("inf")).item()
    assert norm == pytest.approx(reference, rel=1e-6) and norm > 0.5
    for ours, theirs in zip(*parameters):
        if ours.grad is not None:
            torch.testing.assert_close(ours.grad, theirs.grad)  # clipped (0.5) or untouched, as clip_grad_norm_


def test_the_gradient_norm_on_a_cpu_equals_a_float64_recomputation(monkeypatch):
    """Chunked float32 dot products summed in float64: within 1e-6 of the float64 norm where float32 sums of millions
    of squares drift (a bias on every value makes the squares add up without cancelling), over chunk boundaries,
    views and non-contiguous gradients; an infinite or NaN gradient gives an infinite or NaN norm, which makes the
    loop skip the update."""
    monkeypatch.setattr(training, "NORM_CHUNK", 1000)
    torch.manual_seed(0)
    parameters = [torch.nn.Parameter(torch.empty(shape)) for shape in [(3000, 700), (2500,), (7,), (64, 64)]]
    for parameter in parameters:
        parameter.grad = torch.randn(parameter.shape) * 1e-3 + 1e-3
    parameters[3].grad = parameters[3].grad.t()  # not contiguous
    reference = math.sqrt(sum(float(p.grad.double().square().sum()) for p in parameters))
    assert training.gradient_norm(parameters, None) == pytest.approx(reference, rel=1e-6)
    for bad in (math.inf, math.nan):
        parameters[1].grad[5] = bad
        assert repr(training.gradient_norm(parameters, None)) == repr(bad)


def test_yaml_and_flag_errors_name_the_file_and_key(tmp_path):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("max_step: 10\n")
    late = tmp_path / "late.yaml"
    late.write_text("# the paper's recipe\nseed: 1\nmodel_overrides: {max_tokens: 3}\n\nmax_tokens: lots\n")
    with pytest.raises(ValueError, match=r"late\.yaml, line 5: 'max_tokens' must be an integer, got 'lots'"):
        load_yaml_config(late)
    with pytest.raises(ValueError, match=r"bad_key\.yaml, line 1: unknown setting 'max_step'. Did you mean 'max_steps'"):
        load_yaml_config(bad_key)
    bad_type = tmp_path / "bad_type.yaml"
    bad_type.write_text("max_tokens: lots\n")
    with pytest.raises(ValueError, match=r"bad_type\.yaml, line 1: 'max_tokens' must be an integer, got 'lots'"):
        parse_config(["--config", str(bad_type)])
    bad_value = tmp_path / "bad_value.yaml"
    bad_value.write_text("warmup_steps: 0\n")
    with pytest.raises(ValueError, match=r"bad_value\.yaml, line 1: 'warmup_steps' must be a positive integer, got 0"):
        parse_config(["--config", str(bad_value)])
    with pytest.raises(ValueError, match=r"flag --label_smoothing: 'label_smoothing' must be a number in \[0, 1\)"):
        parse_config(["--label_smoothing", "1.5"])
    with pytest.raises(ValueError, match=r"'max_source_length' \(300\) is larger than 'max_tokens'"):
        parse_config(["--max_tokens", "200", "--max_source_length", "300", "--max_target_length", "100"])
    with pytest.raises(ValueError, match=r"'model_overrides' must be a mapping of Seq2SeqTransformerConfig fields \(unknown: n_layers\)"):
        parse_config(["--model_overrides", '{"n_layers": 2}'])
    # Fields the run sets itself (from the tokenizer, or its own settings) are refused before any work, saying where.
    with pytest.raises(ValueError, match=r"'model_overrides' must be fields other than those the run sets itself "
                                         r"\(label_smoothing: set label_smoothing in the run's settings; vocab_size: "):
        parse_config(["--model_overrides", '{"vocab_size": 600, "label_smoothing": 0.2}'])
    # Overrides that make an invalid model are blamed on the flag, before any work; the preset file is fine.
    with pytest.raises(ValueError, match=r"flag --model_overrides: 'model_overrides' must be fields that make a valid "
                                         r"model with transformer-tiny \(.*expected a divisor of d_model=30"):
        parse_config(["--model_config", "transformer-tiny", "--model_overrides", '{"d_model": 30}'])
    broken_preset = tmp_path / "broken.json"
    broken_preset.write_text('{"d_model": 30, "encoder_attention_heads": 4}')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(broken_preset))}: .*expected a divisor of d_model=30"):
        parse_config(["--model_config", str(broken_preset), "--model_overrides", '{"encoder_layers": 1}'])
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"list\.yaml: expected a mapping"):
        load_yaml_config(not_mapping)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("seed: 1  # Gr\u00fc\u00dfe\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.yaml: not UTF-8 text"):
        load_yaml_config(latin1)
    with pytest.raises(ValueError, match="is a folder"):
        load_yaml_config(tmp_path)
    twice = tmp_path / "twice.yaml"
    twice.write_text("max_steps: 5\nseed: 1\nmodel_overrides: {d_model: 8,\n  d_model: 16}\n")
    with pytest.raises(ValueError, match=r"twice\.yaml, line 4: 'd_model' is given twice"):
        load_yaml_config(twice)
    twice.write_text("max_steps: 5\nseed: 1\nmax_steps: 7\n")
    with pytest.raises(ValueError, match=r"twice\.yaml, line 3: 'max_steps' is given twice"):
        load_yaml_config(twice)
    # YAML 1.1 reads 1e-9 as text and an unquoted no as false: a number is taken as one, the rest explained.
    yaml11 = tmp_path / "yaml11.yaml"
    yaml11.write_text("adam_epsilon: 1e-9\n")
    assert parse_config(["--config", str(yaml11)]).adam_epsilon == 1e-9
    for text, message in [("max_steps: 1e3\n", r"'max_steps' must be an integer, unquoted and written out \(1000, not "),
                          ("max_steps: 0.5\n", r"'max_steps' must be an integer, got 0.5"),
                          ("mixed_precision: no\n", r"'mixed_precision' must be a string \(YAML reads an unquoted no"),
                          ("on: 3\n", r"unknown setting 'True'. \(YAML reads an unquoted no, yes, off or on"),
                          ("dataset_config_name: de-en\n", r"'dataset_config_name' must be given only with dataset_name")]:
        yaml11.write_text(text)
        with pytest.raises(ValueError, match=rf"yaml11\.yaml, line 1: {message}"):
            parse_config(["--config", str(yaml11)])
    with pytest.raises(ValueError, match=r"flag --seed: 'seed' must be a whole number from 0 to 2\*\*31 - 1, got -1"):
        parse_config(["--seed", "-1"])
    with pytest.raises(ValueError, match=r"flag --output_dir: 'output_dir' must be a folder path, got ''"):
        parse_config(["--output_dir", ""])
    with pytest.raises(ValueError, match=r"flag --output_dir: 'output_dir' must be a folder \(this is a file\)"):
        parse_config(["--output_dir", str(twice)])
    with pytest.raises(SystemExit):
        parse_config(["--mixed_precision", "fp8"])
    assert training.main(["--config", str(bad_key)]) == 2
    # A mistyped checkpoint path is refused before the output folder is made.
    assert training.main(["--resume_from_checkpoint", str(tmp_path / "chekpoint-4"), "--output_dir", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


def test_flags_override_yaml_and_recipes_parse(tmp_path, capsys):
    assert parse_config([]).model_config == "configs/transformer-tiny.json", "no arguments: the main job"
    assert "default recipe configs/train-tiny.yaml" in capsys.readouterr().out
    assert parse_config(["--train_file", "x.jsonl"]).model_config == "configs/transformer-base.json"
    config = parse_config(["--config", str(REPO / "configs/train-tiny.yaml"), "--max_steps", "7", "--seed", "3"])
    assert config.max_steps == 7 and config.seed == 3 and config.model_config == "configs/transformer-tiny.json"
    base = parse_config(["--config", str(REPO / "configs/train-base-wmt14.yaml")])
    assert (base.adam_beta1, base.adam_beta2, base.adam_epsilon) == (0.9, 0.98, 1e-9)
    assert base.warmup_steps == 4000 and base.label_smoothing == 0.1 and base.dataset_name == "wmt14"
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(str(REPO / f"configs/accelerate/{name}.yaml")).distributed_type.value
             for name in ("cpu", "single_gpu", "multi_gpu", "fsdp")}
    assert kinds == {"cpu": "NO", "single_gpu": "NO", "multi_gpu": "MULTI_GPU", "fsdp": "FSDP"}


# --------------------------------------------------------------------------------------------------------
# A short run, and what it leaves behind


@pytest.fixture(scope="module")
def short_run(assets, tmp_path_factory):
    """40 steps with its own BPE tokenizer, validation every 10 steps, checkpoints and a picture."""
    output_dir = tmp_path_factory.mktemp("short_run")
    args = run_args(assets, output_dir, tokenizer=None, vocab_size=300, max_steps=40, eval_steps=10, save_steps=20,
                    plot=True, warmup_steps=20)
    assert training.main(args) == 0
    return output_dir


def test_short_run_lowers_validation_loss(short_run):
    evals = [r for r in read_log(short_run) if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, evals
    for record in evals:
        assert {"val_loss", "val_bleu", "val_chrf", "val_exact_match", "val_ppl"} <= record.keys()


def test_the_model_card_of_a_run_shows_its_settings(short_run, tmp_path):
    from modeling_seq2seq.hub import build_hub_folder

    build_hub_folder(short_run, tmp_path / "hub")
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "Settings of this run (`eval_results.json`)" in card
    assert "| `warmup_steps` | `20` |" in card and "| `max_steps` | `40` |" in card
    assert "Trained for 40 optimiser steps" in card
    assert "average of the last" not in card  # run_args averages no checkpoints


def test_a_run_on_local_files_says_so_in_its_results(assets, tmp_path, monkeypatch, capsys):
    """The model card tells a local file from a Hub dataset by what train.py records, not by the path's shape. Without
    a validation file the run says it validates nothing (it said nothing; with --average_checkpoints the message says
    the average is not validated either)."""
    from modeling_seq2seq.hub import _dataset_info

    data = tmp_path / "corpora" / "numbers"  # NAME/CONFIG-shaped, as a Hub id would be
    write_builtin_task_as_line_files(data, "de", train=200, test=8)
    output_dir = tmp_path / "local"
    monkeypatch.chdir(tmp_path)  # a relative path, as a user types it
    args = run_args(assets, output_dir, max_steps=2, save_steps=0, train_file="corpora/numbers/train",
                    test_file="corpora/numbers/test", source_lang="en", target_lang="de")
    assert training.main(args) == 0
    assert "No validation split: training without validation.\n" in capsys.readouterr().out
    results = json.loads((output_dir / training.EVAL_RESULTS_NAME).read_text())
    assert results["train_file"] == "corpora/numbers/train" and "dataset_name" not in results
    assert _dataset_info(results) == {"display": "local data (`train`)", "id": None, "type": "train", "config": None}


def test_short_run_files_have_the_usual_permissions(short_run, unusual_permissions):
    """A saved run is readable like any other file (by the group and others, under the usual umask), checkpoints
    included, although safetensors writes private files."""
    assert (short_run / "checkpoint-20" / "model.safetensors").is_file()
    assert unusual_permissions(short_run) == []


def test_short_run_logs_saves_and_reports(short_run):
    records = read_log(short_run)
    train_records = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_records] == list(range(2, 41, 2))
    assert all(r["loss"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0 for r in train_records)
    results = json.loads((short_run / training.EVAL_RESULTS_NAME).read_text())
    assert {"test_bleu", "test_chrf", "test_exact_match", "bleu_signature", "dataset", "source_lang", "target_lang"} <= results.keys()
    assert results["dataset"] == "builtin-number-words" and results["stop_reason"] == "max_steps" and results["step"] == 40
    assert results["bleu_signature"].startswith("nrefs:1")
    recipe = results["training_config"]
    assert (recipe["warmup_steps"], recipe["max_steps"], recipe["label_smoothing"], recipe["processes"]) == (20, 40, 0.1, 1)
    assert not {"output_dir", "train_file", "tokenizer"} & recipe.keys()  # no local paths in a public model card
    assert "train_file" not in results and "dataset_name" not in results  # the built-in task
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 training.CURVES_FILE_NAME):
        assert (short_run / name).is_file(), name
    assert [p.name for _, p in ckpt.list_checkpoints(short_run)] == ["checkpoint-20", "checkpoint-40"]
    assert all(ckpt.verify_checkpoint(p) is None for _, p in ckpt.list_checkpoints(short_run))
    assert not [p for p in short_run.iterdir() if p.name.startswith(".")], "no staging files left"
    # The tokenizer trained for the run is the one saved with the model.
    assert json.loads((short_run / "tokenizer.json").read_text()) == json.loads((short_run / "tokenizer" / "tokenizer.json").read_text())

    model, tokenizer = training.load_model_and_tokenizer(short_run, device="cpu")
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 64  # tied, as in transformers
    assert model.generation_config.num_beams == 1
    assert model.config.label_smoothing == 0.1 and model.config.d_model == 32
    out = model.generate(**tokenizer(["forty-two"], return_tensors="pt"), max_new_tokens=5)
    assert out.shape[0] == 1


def load_script(name):
    path = REPO / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_translate_script_restores_file_order(short_run, tmp_path, monkeypatch, capsys):
    lines = ["one", "", "nine thousand, nine hundred and ninety-nine", "twenty-one", "three hundred"]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(lines) + "\n")
    model, tokenizer = training.load_model_and_tokenizer(short_run, device="cpu")
    one_by_one = [training.translate_texts(model, tokenizer, [line], batch_size=1) for line in lines if line]
    translate = load_script("translate")
    assert translate.main(["--model", str(short_run), "--input", str(source), "--output", str(tmp_path / "out.txt"),
                           "--batch_size", "1"]) == 0
    output = (tmp_path / "out.txt").read_text().split("\n")[:-1]
    assert len(output) == len(lines) and output[1] == ""
    assert [o for i, o in enumerate(output) if lines[i]] == [t[0] for t in one_by_one]
    # stdin -> stdout, batched and with beams
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"one\ntwo\n")))
    assert translate.main(["--model", str(short_run), "--num_beams", "2", "--batch_size", "8"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    # A byte order mark is no part of the first line (as in the data files), on stdin or in a file.
    with_bom = tmp_path / "bom.txt"
    with_bom.write_bytes(b"\xef\xbb\xbf" + source.read_bytes())
    assert translate.main(["--model", str(short_run), "--input", str(with_bom), "--output", str(tmp_path / "bom.out"),
                           "--batch_size", "1"]) == 0
    assert (tmp_path / "bom.out").read_text() == (tmp_path / "out.txt").read_text()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(with_bom.read_bytes())))
    assert translate.main(["--model", str(short_run), "--batch_size", "1"]) == 0
    assert capsys.readouterr().out == (tmp_path / "out.txt").read_text()


def test_translate_and_evaluate_refuse_outputs_that_would_destroy_an_input_or_the_model(short_run, tmp_path, capsys):
    """An output that is an input file (also through a link), another output, or a file inside the model folder is
    refused before any work, naming both options; every file stays as it was."""
    import hashlib

    def fingerprint():
        files = [tmp_path / name for name in ("in.txt", "refs.txt", "test.en", "test.de")] + sorted(short_run.iterdir())
        return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}

    (tmp_path / "in.txt").write_text("one\ntwo\n")
    (tmp_path / "refs.txt").write_text("eins\nzwei\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "in.txt")
    (tmp_path / "test.en").write_text("one\ntwo\n")  # line-aligned files read through --test_file's prefix
    (tmp_path / "test.de").write_text("eins\nzwei\n")
    before = fingerprint()
    translate, evaluate = load_script("translate"), load_script("evaluate")
    model, source, refs = str(short_run), str(tmp_path / "in.txt"), str(tmp_path / "refs.txt")
    cases = [
        (translate, ["--input", source, "--output", source], "--output", "the same file as --input"),
        (translate, ["--input", source, "--output", str(tmp_path / "link.txt")], "--output", "the same file as --input"),
        (translate, ["--input", source, "--output", str(short_run / "model.safetensors")], "--output", "inside the model folder"),
        (evaluate, ["--source_file", source, "--reference_file", refs, "--predictions_file", source],
         "--predictions_file", "the same file as --source_file"),
        (evaluate, ["--source_file", source, "--reference_file", refs, "--output_json", refs],
         "--output_json", "the same file as --reference_file"),
        (evaluate, ["--source_file", source, "--reference_file", refs, "--output_json", str(short_run / "config.json")],
         "--output_json", "inside the model folder"),
        (evaluate, ["--source_file", source, "--reference_file", refs, "--output_json", str(tmp_path / "o.txt"),
                    "--predictions_file", str(tmp_path / "o.txt")], "--output_json", "the same file as --predictions_file"),
        (evaluate, ["--test_file", str(tmp_path / "test"), "--predictions_file", str(tmp_path / "test.de")],
         "--predictions_file", "the same file as --test_file's de side"),
        (evaluate, ["--test_file", str(tmp_path / "test"), "--output_json", str(tmp_path / "test.en")],
         "--output_json", "the same file as --test_file's en side"),
    ]
    for script, arguments, option, message in cases:
        assert script.main(["--model", model, *arguments]) == 1, arguments
        error = capsys.readouterr().err
        assert option in error and message in error, (arguments, error)
        assert fingerprint() == before and not (tmp_path / "o.txt").exists()
    assert translate.main(["--model", model, "--input", source, "--output", str(tmp_path / "out.txt")]) == 0
    # Both outputs on /dev/stdout are fine, whatever file the shell (here pytest's capture) made standard output.
    training.check_output_file("/dev/stdout", "--output_json", {"--predictions_file": "/dev/stdout"})


def test_translate_truncates_a_runaway_line_at_the_models_length_and_names_it(short_run, tmp_path, caplog):
    """Untruncated, one line of thousands of words took minutes (its output may be as long); by default translate.py
    truncates sources at max_position_embeddings tokens, with a warning naming the line."""
    model, tokenizer = training.load_model_and_tokenizer(short_run, device="cpu")
    limit = model.config.max_position_embeddings
    source = tmp_path / "in.txt"
    source.write_text("one\n" + "three " * (4 * limit) + "\n")
    with caplog.at_level("WARNING"):
        assert load_script("translate").main(["--model", str(short_run), "--input", str(source),
                                              "--output", str(tmp_path / "out.txt"), "--num_beams", "1"]) == 0
    assert f"1 source(s) longer than {limit} tokens truncated to that length: {source}, line 2" in caplog.text
    outputs = (tmp_path / "out.txt").read_text().split("\n")[:-1]
    assert len(outputs) == 2 and len(tokenizer(outputs[1])["input_ids"]) <= limit + 50 + 1
    # evaluate.py names the line too (after a skipped empty pair), and elsewhere the sentence's first words
    source.write_text("one\n\n" + "three " * (4 * limit) + "\n")
    references = tmp_path / "references.txt"
    references.write_text("eins\n\ndrei\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert load_script("evaluate").main(["--model", str(short_run), "--source_file", str(source),
                                             "--reference_file", str(references), "--num_beams", "1"]) == 0
    recorded = json.loads((short_run / training.EVAL_RESULTS_NAME).read_text())["training_config"]["max_source_length"]
    assert recorded < limit  # by default, the cut of train.py's test
    assert f"1 source(s) longer than {recorded} tokens truncated to that length: {source}, line 3" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # another cut, asked for
        assert load_script("evaluate").main(["--model", str(short_run), "--source_file", str(source),
                                             "--reference_file", str(references), "--num_beams", "1",
                                             "--max_source_length", "8"]) == 0
    assert f"1 source(s) longer than 8 tokens truncated to that length: {source}, line 3" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        training.translate_texts(model, tokenizer, ["one", "three " * (4 * limit)], max_source_length=limit)
    assert "truncated to that length: sentence 2 ('three three three three three '...)" in caplog.text


def test_each_source_keeps_its_own_line_whatever_the_model_generates_or_its_generation_config_asks(short_run, tmp_path):
    """Two ways a translated file lost its line alignment, silently: a generation_config.json asking for several
    sequences per source (each source was paired with another's translation) and a line break the model generates
    (the byte-fallback token "<0x0A>": one translation became two lines, every later one moved down). Now each source
    gets its own best sequence on its own line, the break read as a space, as BLEU and chrF read it."""
    lines = ["one", "twenty-one", "three hundred", "forty-two"]
    source = tmp_path / "in.txt"
    source.write_text("".join(line + "\n" for line in lines))
    translate = load_script("translate")

    def translated(model_dir, *options):
        out = tmp_path / "out.txt"
        assert translate.main(["--model", str(model_dir), "--input", str(source), "--output", str(out), *options]) == 0
        return out.read_text(encoding="utf-8").split("\n")[:-1]

    def copy_of_model(name):
        folder = tmp_path / name
        folder.mkdir()
        for file in short_run.iterdir():
            if file.is_file() and file.name != ckpt.MANIFEST_NAME:
                shutil.copy(file, folder / file.name)
        return folder

    expected = translated(short_run, "--num_beams", "4")
    several = copy_of_model("several")
    settings = json.loads((several / "generation_config.json").read_text())
    settings.update(num_beams=4, num_return_sequences=2, return_dict_in_generate=True)
    (several / "generation_config.json").write_text(json.dumps(settings))
    assert translated(several) == expected

    # A copy whose "<0x0A>" is, to the model, the second token it generates for "twenty-one" (a hair more likely).
    model, tokenizer = training.load_model_and_tokenizer(short_run, device="cpu")
    start, first, second = model.generate(**tokenizer(["twenty-one"], return_tensors="pt"), num_beams=1,
                                          max_new_tokens=2)[0].tolist()
    newline = tokenizer.convert_tokens_to_ids("<0x0A>")
    assert tokenizer.decode([newline]) == "\n" and newline not in (first, second) and first != second
    breaking = copy_of_model("breaking")
    weights = load_file(breaking / "model.safetensors")
    weights["model.shared.weight"][newline] = weights["model.shared.weight"][second]
    weights["lm_head.bias"] = torch.zeros(model.config.vocab_size)
    weights["lm_head.bias"][newline] = 1e-3
    save_file(weights, breaking / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((breaking / "config.json").read_text())
    (breaking / "config.json").write_text(json.dumps({**config, "output_bias": True}))
    model, tokenizer = training.load_model_and_tokenizer(breaking, device="cpu")
    batch = tokenizer(lines, return_tensors="pt", padding=True)
    longest = batch["input_ids"].shape[1]  # translate.py's limit for a batch: its longest source + 50 new tokens
    raw = tokenizer.batch_decode(model.generate(**batch, num_beams=1, max_length=longest + 51), skip_special_tokens=True)
    assert "\n" in raw[1].strip()
    assert translated(breaking, "--num_beams", "1") == [re.sub(r"\s*\n\s*", " ", text).strip() for text in raw]


def test_output_files_are_tried_without_harm_to_pipes_links_or_contents(tmp_path):
    """`check_output_file` opens a regular file (keeping its contents) and creates, then removes, a new one; a named
    pipe is not opened (that would end its reader's input), and a link whose target is missing is left as it is."""
    import threading

    kept = tmp_path / "kept.txt"
    kept.write_text("mine\n")
    training.check_output_file(str(kept), "--output")
    training.check_output_file(str(tmp_path / "new.txt"), "--output")
    assert kept.read_text() == "mine\n" and not (tmp_path / "new.txt").exists()
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "elsewhere" / "out.txt")
    training.check_output_file(str(link), "--output")
    assert link.is_symlink() and not (tmp_path / "elsewhere").exists()
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        checking = threading.Thread(target=training.check_output_file, args=(str(fifo), "--output"), daemon=True)
        checking.start()
        checking.join(10)
        if checking.is_alive():  # blocked opening the pipe: give it a reader so that the thread ends
            open(fifo, "rb").close()
        assert not checking.is_alive() or pytest.fail("check_output_file opened the named pipe")


def test_output_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """`write_output_file`: a regular file gets the new text whole, through a temporary file renamed over it; when the
    write fails (here: the disk is full at fsync), the old contents stay and no temporary file is left. A symlink
    stays a link, `/dev/stdout` appends to a file the shell opened with `>>`, and a named pipe is written into, not
    replaced."""
    import errno
    import threading

    out = tmp_path / "out.txt"
    out.write_text("old translations\n")
    training.write_output_file(out, "new\n")
    assert out.read_text() == "new\n"
    real_fsync = ckpt.os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        training.write_output_file(out, "half of something\n")
    assert out.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    monkeypatch.setattr(ckpt.os, "fsync", real_fsync)
    link = tmp_path / "link.txt"
    link.symlink_to(out)
    training.write_output_file(link, "through the link\n")
    assert link.is_symlink() and out.read_text() == "through the link\n"
    appended = tmp_path / "appended.txt"  # `translate.py --output /dev/stdout >> appended.txt`
    appended.write_text("earlier\n")
    script = "from modeling_seq2seq.training import write_output_file; write_output_file('/dev/stdout', 'later\\n')"
    with open(appended, "a") as shell_redirect:
        subprocess.run([sys.executable, "-c", script], stdout=shell_redirect, check=True, env=SUBPROCESS_ENV)
    assert appended.read_text() == "earlier\nlater\n"
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        received = []
        reader = threading.Thread(target=lambda: received.append(open(fifo, encoding="utf-8").read()), daemon=True)
        reader.start()
        training.write_output_file(fifo, "into the pipe\n")
        reader.join(10)
        assert received == ["into the pipe\n"] and fifo.is_fifo()


def test_a_translation_that_cannot_be_written_keeps_the_old_output(short_run, tmp_path, monkeypatch, capsys):
    import errno

    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("one\n")
    out.write_text("yesterday's translations\n")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", disk_full)
    translate = load_script("translate")
    assert translate.main(["--model", str(short_run), "--input", str(source), "--output", str(out)]) == 1
    assert f"error: --output {str(out)!r} could not be written ([Errno 28] No space left on device); the file is as it " \
           "was." in capsys.readouterr().err
    assert out.read_text() == "yesterday's translations\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


def test_a_mixed_precision_model_translates_on_the_fast_search_during_training():
    """Accelerate's mixed precision replaces `forward` on the instance, which makes `generate` step aside for
    transformers' loop; the training loop's translations run under autocast and lift the wrapper for the fast one."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from modeling_seq2seq import Seq2SeqTransformerConfig, Seq2SeqTransformerForConditionalGeneration

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = accelerator.prepare(Seq2SeqTransformerForConditionalGeneration(Seq2SeqTransformerConfig(**TINY_MODEL)))
    model = accelerator.unwrap_model(model).eval()
    wrapper = vars(model)["forward"]
    assert model.forward_calls_are_observed()
    with accelerator.autocast(), training.without_mixed_precision_wrapper(model):
        assert not model.forward_calls_are_observed()
    assert vars(model)["forward"] is wrapper
    AcceleratorState._reset_state(reset_partial_state=True)


def test_translate_and_evaluate_scripts_check_their_inputs_first(short_run, tmp_path, capsys, monkeypatch, caplog):
    """Lines are split at line feeds only, text that is not UTF-8 is named by file and line, and bad options or an
    output path that cannot be written fail before any translating."""
    translate, evaluate = load_script("translate"), load_script("evaluate")
    source = tmp_path / "in.txt"
    source.write_text("one\ntwo\u2028three\nfour\x0cfive\r\nsix\n", encoding="utf-8")
    assert translate.main(["--model", str(short_run), "--input", str(source), "--output", str(tmp_path / "out.txt")]) == 0
    assert len((tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")) == 4 + 1
    broken = tmp_path / "broken.txt"
    broken.write_bytes(b"one\ntw\xffo\n")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"one\ntwo\nthr\0ee\n")
    mac = tmp_path / "mac.txt"
    mac.write_bytes(b"one\rtwo\rthree\r")  # lines ended by carriage returns alone: one line, not three
    unwritable = [(["--input", str(source), "--output", "/proc/out.txt"], "'/proc/out.txt' cannot be written")]
    for args, message in [
        (["--input", str(broken)], f"--input {broken}, line 2: not UTF-8 text"),
        (["--input", "-"], "--input <stdin>, line 2: not UTF-8 text"),
        (["--input", str(tmp_path / "missing.txt")], f"--input {tmp_path / 'missing.txt'}: cannot be read (No such file"),
        (["--input", str(tmp_path)], f"--input {tmp_path}: cannot be read (Is a directory)"),
        (["--input", str(nul)], f"--input {nul}, line 3: contains NUL bytes"),
        (["--input", str(mac)], f"--input {mac}, line 1: contains a carriage return inside the line"),
        (["--input", str(source), "--output", str(tmp_path / "no" / "out.txt")], "does not exist"),
        *(unwritable if Path("/proc").is_dir() else []),
        (["--input", str(source), "--output", str(tmp_path)], "is a folder, not a file"),
        (["--input", str(source), "--device", "gpu7"], "not a device name"),
        (["--input", str(source), "--device", "meta"], "'meta': the meta device holds no data"),
        (["--input", str(source), "--num_beams", "100000"], "--num_beams 100000: more beams than the model has tokens"),
    ]:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(broken.read_bytes())))
        assert translate.main(["--model", str(short_run), *args]) == 1
        assert message in capsys.readouterr().err
    for args in (["--max_source_length", "0"], ["--max_new_tokens_extra", "-1"], ["--length_penalty", "nan"]):
        with pytest.raises(SystemExit):
            translate.main(["--model", str(short_run), "--input", str(source), *args])
    assert "--length_penalty: expected a finite number, got 'nan'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(short_run), "--length_penalty", "inf"])
    assert "--length_penalty: expected a finite number, got 'inf'" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert evaluate.main(["--model", str(short_run), "--source_file", str(empty), "--reference_file", str(empty)]) == 1
    assert "no sentences to evaluate" in capsys.readouterr().err
    assert evaluate.main(["--model", str(short_run), "--source_file", str(source), "--reference_file", str(source),
                          "--num_beams", "100000"]) == 1
    assert "--num_beams 100000: more beams than the model has tokens" in capsys.readouterr().err
    # The language pair defaults to the one the model was trained on (its eval_results.json), not en-de.
    french = tmp_path / "french"
    shutil.copytree(short_run, french, ignore=shutil.ignore_patterns("checkpoint-*"))
    results = json.loads((french / "eval_results.json").read_text())
    (french / "eval_results.json").write_text(json.dumps({**results, "target_lang": "fr"}))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"translation": {"en": "one", "fr": "un"}}\n{"translation": {"en": "two", "fr": "deux"}}\n')
    assert evaluate.main(["--model", str(french), "--test_file", str(pairs), "--num_beams", "1"]) == 0
    assert evaluate.main(["--model", str(french), "--test_file", str(pairs), "--target_lang", "de"]) == 1
    assert "missing language field(s) ['de']" in capsys.readouterr().err
    beams = tmp_path / "beams"  # the generation config's beams, when no --num_beams is given
    shutil.copytree(short_run, beams, ignore=shutil.ignore_patterns("checkpoint-*"))
    settings = json.loads((beams / "generation_config.json").read_text())
    (beams / "generation_config.json").write_text(json.dumps({**settings, "num_beams": 100000}))
    assert translate.main(["--model", str(beams), "--input", str(source), "--output", str(tmp_path / "b.txt")]) == 1
    assert "generation_config.json's num_beams 100000: more beams than the model has tokens" in capsys.readouterr().err
    assert evaluate.main(["--model", str(short_run), "--source_file", str(broken), "--reference_file", str(source)]) == 1
    assert f"--source_file {broken}, line 2: not UTF-8 text" in capsys.readouterr().err
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("one\ntwo\n", encoding="utf-16")
    assert evaluate.main(["--model", str(short_run), "--source_file", str(utf16), "--reference_file", str(source)]) == 1
    assert f"--source_file {utf16}: UTF-16 text (it starts with a UTF-16 byte order mark); save it as UTF-8" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the --test_file was left unread, without a word
        evaluate.main(["--model", str(short_run), "--test_file", str(source), "--source_file", str(source),
                       "--reference_file", str(source)])
    assert "--test_file or --source_file/--reference_file: one test set, not both" in capsys.readouterr().err
    # A pair with an empty side is skipped with a warning (as in the data files), not translated and scored.
    sources, references = tmp_path / "src.txt", tmp_path / "ref.txt"
    sources.write_text("one\n\ntwo\nthree\n")
    references.write_text("eins\n\nzwei\n \n")
    assert evaluate.main(["--model", str(short_run), "--source_file", str(sources), "--reference_file", str(references),
                          "--output_json", str(tmp_path / "scores.json"), "--predictions_file", str(tmp_path / "p.txt")]) == 0
    assert json.loads((tmp_path / "scores.json").read_text())["samples"] == 2
    predictions = (tmp_path / "p.txt").read_text().split("\n")
    assert len(predictions) == 4 + 1 and predictions[1] == predictions[3] == "" and predictions[0] and predictions[2]
    assert "skipped 2 pair(s) with an empty source or target (lines 2, 4)" in caplog.text
    for args in (["--max_samples", "0"], ["--batch_size", "0"], ["--num_beams", "0"]):
        with pytest.raises(SystemExit):
            evaluate.main(["--model", str(short_run), *args])


def test_evaluate_script_reports_bleu_with_signature(short_run, tmp_path, capsys):
    evaluate = load_script("evaluate")
    pairs = tmp_path / "test.jsonl"
    pairs.write_text("".join(json.dumps({"translation": {"en": e, "de": d}}) + "\n" for e, d in [("one", "eins"), ("two", "zwei")]))
    assert evaluate.main(["--model", str(short_run), "--test_file", str(pairs), "--output_json", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["samples"] == 2 and scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no")
    assert evaluate.main(["--model", str(short_run), "--max_samples", "8", "--num_beams", "1"]) == 0
    out = capsys.readouterr().out
    assert "builtin-number-words: 8 sentences" in out and "BLEU signature" in out
    assert evaluate.main(["--model", str(tmp_path / "nothing")]) == 1
    # BLEU's tokenizer: by --target_lang as sacrebleu's command line picks it, or --tokenize; a bad one before any work.
    (tmp_path / "src.en").write_text("one\n")
    (tmp_path / "ref.zh").write_text("一\n")
    for options, tokenizer in ((["--target_lang", "zh"], "zh"), (["--tokenize", "intl"], "intl"), ([], "13a")):
        assert evaluate.main(["--model", str(short_run), "--source_file", str(tmp_path / "src.en"), "--reference_file",
                              str(tmp_path / "ref.zh"), "--output_json", str(tmp_path / "s.json"), *options]) == 0
        assert f"|tok:{tokenizer}|" in json.loads((tmp_path / "s.json").read_text())["bleu_signature"]
    capsys.readouterr()
    assert evaluate.main(["--model", str(short_run), "--tokenize", "moses"]) == 1
    assert "error: --tokenize: BLEU tokenizer 'moses' is not one of sacrebleu's" in capsys.readouterr().err



def test_evaluate_reproduces_the_test_score_train_py_reported_from_what_the_folder_records(short_run, tmp_path, capsys):
    """Unset, evaluate.py's language pair, batch size, source cut and output margin are train.py's for that model (its
    eval_results.json; a checkpoint's trainer_state.json; the checkpoints an average was made from), so it gives the
    score train.py reported and the card publishes (it cut no sources and batched by 64: another score); with nothing
    recorded (a converted or downloaded model) it says which language pair it assumed."""
    evaluate = load_script("evaluate")
    reported = json.loads((short_run / training.EVAL_RESULTS_NAME).read_text())
    capsys.readouterr()
    assert evaluate.main(["--model", str(short_run), "--max_samples", str(reported["test_samples"]),
                          "--output_json", str(tmp_path / "s.json")]) == 0
    assert (f"As train.py ran this model ({short_run / training.EVAL_RESULTS_NAME}): source_lang en, target_lang de, "
            "eval_batch_size 16, max_source_length 32, max_new_tokens_extra 50") in capsys.readouterr().err
    scores = json.loads((tmp_path / "s.json").read_text())
    assert (scores["bleu"], scores["chrf"], scores["exact_match"]) == (
        reported["test_bleu"], reported["test_chrf"], reported["test_exact_match"])
    # The test's own power: the earlier defaults (sources not cut, 64 a batch) score otherwise.
    assert evaluate.main(["--model", str(short_run), "--max_samples", str(reported["test_samples"]),
                          "--output_json", str(tmp_path / "s.json"), "--max_source_length", "64", "--batch_size", "64"]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["chrf"] != reported["test_chrf"]
    averaged = tmp_path / "averaged"
    assert load_script("average_checkpoints").main(["--input_dir", str(short_run), "--last", "2", "--output", str(averaged)]) == 0
    for folder, record in ((short_run / "checkpoint-20", short_run / "checkpoint-20" / ckpt.TRAINER_STATE_NAME),
                           (averaged, averaged / ckpt.AVERAGED_FROM_NAME)):
        assert evaluate.main(["--model", str(folder), "--max_samples", "2"]) == 0
        assert f"As train.py ran this model ({record}): source_lang en, target_lang de, eval_batch_size 16" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(short_run / "checkpoint-20", bare, ignore=shutil.ignore_patterns(ckpt.TRAINER_STATE_NAME, "manifest.json"))
    (tmp_path / "src.en").write_text("one\n")
    (tmp_path / "ref.de").write_text("eins\n")
    assert evaluate.main(["--model", str(bare), "--source_file", str(tmp_path / "src.en"), "--reference_file",
                          str(tmp_path / "ref.de"), "--target_lang", "de"]) == 0
    assert (f"warning: {bare} records no language pair (no eval_results.json or checkpoint state of train.py's): "
            "taking en->de; pass --source_lang (the target language picks the BLEU tokenizer).") in capsys.readouterr().err
    # Records that are not train.py's, or damaged, are passed over (a Seq2SeqTrainer's trainer_state.json raised
    # KeyError; a null training_config TypeError; a batch size of 0 failed deep in the batching).
    (bare / ckpt.TRAINER_STATE_NAME).write_text(json.dumps({"global_step": 10, "log_history": []}))
    arguments = ["--model", str(bare), "--source_file", str(tmp_path / "src.en"), "--reference_file", str(tmp_path / "ref.de")]
    assert evaluate.main(arguments) == 0
    assert f"warning: {bare} records no language pair" in capsys.readouterr().err
    (bare / training.EVAL_RESULTS_NAME).write_text(json.dumps(
        {"training_config": None, "eval_batch_size": 0, "max_source_length": 1, "source_lang": "en", "target_lang": "de"}))
    assert evaluate.main(arguments) == 0
    said = capsys.readouterr().err
    assert f"({bare / training.EVAL_RESULTS_NAME}): source_lang en, target_lang de\n" in said and "warning" not in said


# What the scripts compute, against independent references.


def test_evaluate_scores_are_sacrebleus_on_the_predictions_it_writes(short_run, tmp_path):
    """BLEU and chrF of evaluate.py equal sacrebleu's own on (hypotheses = the predictions written, references), for
    the pairs --max_samples keeps; a skipped pair before the cut keeps its (empty) line; --effective_order reaches
    BLEU."""
    import sacrebleu

    evaluate = load_script("evaluate")
    sources = ["one", "", "twenty-one", "three hundred", "forty-two", "seven"]
    references = ["eins eins eins eins", "", "einundzwanzig und so weiter", "dreihundert drei drei", "zweiundvierzig",
                  "sieben"]
    (tmp_path / "src.en").write_text("".join(line + "\n" for line in sources))
    (tmp_path / "ref.de").write_text("".join(line + "\n" for line in references))
    for flag, bleu in (("--no-effective_order", sacrebleu.metrics.BLEU()),
                       ("--effective_order", sacrebleu.metrics.BLEU(effective_order=True))):
        assert evaluate.main(["--model", str(short_run), "--source_file", str(tmp_path / "src.en"), "--reference_file",
                              str(tmp_path / "ref.de"), "--max_samples", "3", "--num_beams", "1", flag,
                              "--output_json", str(tmp_path / "s.json"), "--predictions_file", str(tmp_path / "p.txt")]) == 0
        lines = (tmp_path / "p.txt").read_text().split("\n")[:-1]
        assert len(lines) == 4 and lines[1] == "", lines  # up to the third kept pair's line; line 2 was skipped
        hypotheses, kept = [lines[i] for i in (0, 2, 3)], [references[i] for i in (0, 2, 3)]
        scores = json.loads((tmp_path / "s.json").read_text())
        assert scores["samples"] == 3
        assert scores["bleu"] == pytest.approx(bleu.corpus_score(hypotheses, [kept]).score)
        assert scores["chrf"] == pytest.approx(sacrebleu.metrics.CHRF().corpus_score(hypotheses, [kept]).score)
        assert ("eff:yes" if flag == "--effective_order" else "eff:no") in scores["bleu_signature"]
        # The test's own power: hypotheses and references swapped would score otherwise.
        assert sacrebleu.metrics.CHRF().corpus_score(kept, [hypotheses]).score != pytest.approx(scores["chrf"])


def test_translate_texts_keeps_each_translation_with_its_source_in_a_batch(short_run, monkeypatch):
    """Sorted by length into one batch of several, the translations come back in the input order, and each equals
    the source's own generate() under the same length limit."""
    model, tokenizer = training.load_model_and_tokenizer(short_run, device="cpu")
    lines = ["one", "nine thousand, nine hundred and ninety-nine", "twenty-one", "three hundred", "forty-two",
             "seven hundred and seven"]
    longest = max(len(tokenizer(line)["input_ids"]) for line in lines)
    expected = []
    with torch.no_grad():
        for line in lines:
            ids = model.generate(**tokenizer([line], return_tensors="pt"), num_beams=1, max_length=longest + 51)
            expected.append(tokenizer.decode(ids[0], skip_special_tokens=True).strip())
    assert training.translate_texts(model, tokenizer, lines, batch_size=len(lines), num_beams=1) == expected

    # A 40-step model may give every source the same translation (it did on an AMD CPU, whose float rounding took
    # training elsewhere), which would hide a mix-up of the order: a generate that echoes each source row gives
    # every source its own output.
    def echo(input_ids, attention_mask, **kwargs):
        start = torch.full((len(input_ids), 1), model.config.decoder_start_token_id)
        return torch.cat([start, input_ids.masked_fill(attention_mask == 0, tokenizer.pad_token_id)], dim=1)

    monkeypatch.setattr(model, "generate", echo)
    sources = [tokenizer.decode(tokenizer(line)["input_ids"], skip_special_tokens=True).strip() for line in lines]
    assert len(set(sources)) == len(lines), sources
    assert training.translate_texts(model, tokenizer, lines, batch_size=len(lines), num_beams=1) == sources


def test_translate_texts_gives_generate_truncated_sources_ending_with_eos_and_the_length_penalty(short_run,
                                                                                                monkeypatch):
    """A truncated source is what the tokenizer's own truncation makes (the end-of-sentence kept last); a length
    penalty applies whenever the search is a beam search, also one the generation config asks for."""
    model, tokenizer = training.load_model_and_tokenizer(short_run, device="cpu")
    model.generation_config.num_beams = 4
    calls, generate = [], model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    text = "three " * 30
    training.translate_texts(model, tokenizer, [text], max_source_length=8, length_penalty=0.6)
    expected = tokenizer(text, truncation=True, max_length=8)["input_ids"]
    assert len(expected) == 8 and expected[-1] == tokenizer.eos_token_id
    assert calls[0]["input_ids"][0].tolist() == expected
    assert calls[0]["length_penalty"] == 0.6


# --------------------------------------------------------------------------------------------------------
# Resume, crashes and faults


@pytest.fixture(scope="module")
def reference_run(assets, tmp_path_factory):
    """The uninterrupted 12-step run that interrupted runs must reproduce."""
    output_dir = tmp_path_factory.mktemp("reference")
    assert training.main(run_args(assets, output_dir)) == 0
    return output_dir


def test_a_tokenizer_given_with_tokenizer_takes_the_models_length(assets, reference_run):
    """As the tokenizer train.py trains: `model_max_length` (what `truncation=True` and the pipeline cut at) is the
    model's max_position_embeddings, not train_tokenizer.py's default (it reached the Hub folder as 1024)."""
    from modeling_seq2seq.tokenization import load_tokenizer

    model, tokenizer = training.load_model_and_tokenizer(reference_run, device="cpu")
    assert load_tokenizer(assets["tokenizer"]).model_max_length != model.config.max_position_embeddings
    assert tokenizer.model_max_length == model.config.max_position_embeddings


def test_stop_and_resume_matches_uninterrupted_run(assets, reference_run, tmp_path):
    output_dir = tmp_path / "resumed"
    assert training.main(run_args(assets, output_dir, max_steps=6)) == 0  # stops mid-way (checkpoint-4, final 6)
    assert training.main(run_args(assets, output_dir, resume_from_checkpoint="latest")) == 0
    assert_same_weights(output_dir, reference_run)
    assert_same_weights(output_dir / "checkpoint-12", reference_run / "checkpoint-12")
    # The log continues where the checkpoint was: one record per step, no duplicates.
    steps = [r["step"] for r in read_log(output_dir) if r["type"] == "train"]
    assert steps == list(range(2, 13, 2))


def test_a_resumed_runs_first_log_record_averages_the_steps_an_uninterrupted_runs_does(assets, tmp_path):
    """Logged every 3 steps and saved every 4, checkpoint-4 falls inside the window of steps 4 to 6: resumed there,
    the record at step 6 still averages steps 4, 5 and 6 (the checkpoint keeps the window), not 5 and 6 alone."""
    run = tmp_path / "run"
    assert training.main(run_args(assets, run, logging_steps=3)) == 0
    expected = [(r["step"], r["loss"]) for r in read_log(run) if r["type"] == "train"]
    assert [step for step, _ in expected] == [3, 6, 9, 12]
    for later in ("checkpoint-8", "checkpoint-12"):  # as if killed at step 5
        shutil.rmtree(run / later)
    assert training.main(run_args(assets, run, logging_steps=3, resume_from_checkpoint="latest")) == 0
    assert [(r["step"], r["loss"]) for r in read_log(run) if r["type"] == "train"] == expected


def test_fresh_run_refuses_an_output_dir_with_checkpoints(assets, reference_run, tmp_path, capsys):
    before = sorted(p.name for p in reference_run.iterdir())
    assert training.main(run_args(assets, reference_run)) == 1
    assert "already holds checkpoints (checkpoint-12, ...)" in capsys.readouterr().err
    assert sorted(p.name for p in reference_run.iterdir()) == before
    # --overwrite_output_dir starts again: the old run's checkpoints go, but not before the data files are read.
    (tmp_path / "old" / "checkpoint-500").mkdir(parents=True)
    missing_data = run_args(assets, tmp_path / "old", max_steps=4, overwrite_output_dir=True,
                            train_file=str(tmp_path / "typo.tsv"))
    assert training.main(missing_data) == 1
    assert "typo.tsv" in capsys.readouterr().err
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "old")] == ["checkpoint-500"]
    # So are the model preset, the tokenizer and the vocabulary size: checked before anything is deleted or written.
    for typo, message in [(dict(model_config=str(tmp_path / "tinny.json")), "tinny.json"),
                          (dict(tokenizer=str(tmp_path / "no-tokenizer")), "'tokenizer' must be an existing tokenizer"),
                          (dict(tokenizer=None, vocab_size=100), "'vocab_size' must be at least 261")]:
        for output_dir in (tmp_path / "old", tmp_path / "fresh"):
            assert training.main(run_args(assets, output_dir, max_steps=4, overwrite_output_dir=True, **typo)) == 2
            assert message in capsys.readouterr().err
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "old")] == ["checkpoint-500"]
    assert not (tmp_path / "fresh").exists()  # nothing written that the corrected command would stumble over
    # And so is everything up to the first step (batches, collation, the step itself): the earlier run's checkpoints
    # and log go only once it has been taken.
    (tmp_path / "old" / training.LOG_FILE_NAME).write_text('{"type": "train", "step": 500}\n')
    too_many = run_args(assets, tmp_path / "old", max_steps=4, overwrite_output_dir=True, gradient_accumulation_steps=10**6)
    assert training.main(too_many) == 1
    assert "too few for 1000000 batches per update" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.Trainer, "train_step", lambda self, batches: (_ for _ in ()).throw(ValueError("step")))
        assert training.main(run_args(assets, tmp_path / "old", max_steps=4, overwrite_output_dir=True)) == 1
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "old")] == ["checkpoint-500"]
    assert read_log(tmp_path / "old") == [{"type": "train", "step": 500}]
    # Killed while replacing the earlier run (here: as the log is truncated, the last part): the earlier checkpoints
    # are already set aside whole, so `latest` cannot quietly go on with the earlier run, and the next start removes
    # them; the log is still the earlier run's.
    (tmp_path / "old" / "checkpoint-500" / "weights.bin").write_text("x")

    def killed(self, step, records=None):
        raise SystemExit("killed")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.JsonlLog, "truncate_after", killed)
        with pytest.raises(SystemExit):
            training.main(run_args(assets, tmp_path / "old", max_steps=4, overwrite_output_dir=True))
    ckpt.unlock_output_dir(tmp_path / "old")  # a killed process's lock goes with it
    assert ckpt.list_checkpoints(tmp_path / "old") == []
    assert [p.name for p in (tmp_path / "old").iterdir() if p.name.startswith(ckpt.REPLACED_PREFIX)] == [
        f"{ckpt.REPLACED_PREFIX}checkpoint-500-{os.getpid()}"]
    assert read_log(tmp_path / "old") == [{"type": "train", "step": 500}]
    assert training.main(run_args(assets, tmp_path / "old", max_steps=4, resume_from_checkpoint="latest")) == 0
    assert not any(p.name.startswith(ckpt.REPLACED_PREFIX) for p in (tmp_path / "old").iterdir())
    assert [r["step"] for r in read_log(tmp_path / "old") if r["type"] == "train"] == [2, 4]
    assert training.main(run_args(assets, tmp_path / "old", max_steps=4, overwrite_output_dir=True)) == 0
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "old")] == ["checkpoint-4"]


def test_a_tokenizer_without_the_special_tokens_or_the_end_of_sentence_is_refused(assets, tmp_path, capsys):
    """A foreign tokenizer (WordLevel, no post-processor) trained silently: the model never saw an end of sentence, so
    it could never learn to stop. Refused by name, before anything is written."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "one": 2, "eins": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bare = tmp_path / "tokenizer.json"
    backend.save(str(bare))
    folder = tmp_path / "foreign"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    for tokenizer, message in [(bare, "the tokenizer does not end a text with its end-of-sentence token '</s>'"),
                               (folder, "the tokenizer has no bos_token, eos_token")]:
        assert training.main(run_args(assets, tmp_path / "out", tokenizer=str(tokenizer))) == 1
        assert f"tokenizer {tokenizer}: {message}" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] in ([], [ckpt.LOCK_NAME])


def test_a_second_run_into_the_output_dir_of_a_live_one_is_refused(assets, tmp_path, capsys):
    """Two runs writing one folder would interleave their logs and delete each other's unfinished checkpoints."""
    output_dir = tmp_path / "busy"
    output_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom modeling_seq2seq import checkpointing as ckpt\n"
         "ckpt.lock_output_dir(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(600)\n", str(output_dir)],
        stdout=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert training.main(run_args(assets, output_dir, max_steps=2)) == 1
        assert f"Another training run (process {holder.pid}) is writing to '{output_dir}'" in capsys.readouterr().err
        assert sorted(p.name for p in output_dir.iterdir()) == [ckpt.LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    assert training.main(run_args(assets, output_dir, max_steps=2)) == 0  # the system freed the killed run's lock


KILL_WHILE_SAVING = """
import io, os, signal, torch
from modeling_seq2seq import checkpointing as ckpt
real_save = ckpt.save_torch_state
def save_then_die(state, path):
    if "checkpoint-8" in str(path) and str(path).endswith("optimizer.pt"):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with open(path, "wb") as handle:  # half of the file reaches the disk, then the process dies
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(state, path)
ckpt.save_torch_state = save_then_die
"""


def test_sigkill_while_writing_a_checkpoint_then_resume(assets, reference_run, tmp_path, caplog):
    output_dir = tmp_path / "killed"
    result = run_subprocess(run_args(assets, output_dir), prelude=KILL_WHILE_SAVING)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (output_dir / ".tmp-checkpoint-8").is_dir(), "killed inside the checkpoint write"
    assert [p.name for _, p in ckpt.list_checkpoints(output_dir)] == ["checkpoint-4"]
    assert ckpt.verify_checkpoint(output_dir / "checkpoint-4") is None, "the previous checkpoint survived"

    with caplog.at_level("WARNING"):
        assert training.main(run_args(assets, output_dir, resume_from_checkpoint="latest")) == 0
    assert ".tmp-checkpoint-8" in caplog.text
    assert_same_weights(output_dir, reference_run)


@pytest.mark.parametrize("damage", ["truncated", "one byte changed"])
def test_torn_newest_checkpoint_is_skipped_on_resume(assets, reference_run, tmp_path, caplog, damage):
    """A damaged newest checkpoint is skipped, and the run resumes from the one before it. A byte changed in place
    (same size) is caught by the hashes; it must not count as a later complete checkpoint that blocks resuming."""
    output_dir = tmp_path / "torn"
    assert training.main(run_args(assets, output_dir, max_steps=8)) == 0
    if damage == "truncated":
        optimizer_file = output_dir / "checkpoint-8" / training.OPTIMIZER_NAME
        optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])  # truncated behind our back
    else:
        weights = output_dir / "checkpoint-8" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        assert training.main(run_args(assets, output_dir, resume_from_checkpoint="latest")) == 0
    assert "Skipping incomplete checkpoint" in caplog.text and "checkpoint-8" in caplog.text
    assert "writes a new one in its place when it saves that step: move it out of the folder to keep it" in caplog.text
    assert_same_weights(output_dir, reference_run)


def torch_bytes(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def edited_state(path, edit) -> bytes:
    state = torch.load(path, weights_only=True) if path.suffix == ".pt" else json.loads(path.read_text())
    edit(state)
    return torch_bytes(state) if path.suffix == ".pt" else json.dumps(state).encode()


def first_moment_of_seven(state):
    state["state"][0]["exp_avg"] = torch.zeros(7)


def first_moment_one_column_wider(state):
    """Right first dimension, wrong second: a check of one dimension only would let it reach the fused kernel."""
    moment = state["state"][0]["exp_avg"]
    assert moment.dim() == 2
    state["state"][0]["exp_avg"] = torch.zeros(moment.shape[0], moment.shape[1] + 1)


def first_moment_as_integers(state):
    state["state"][0]["exp_avg"] = state["state"][0]["exp_avg"].to(torch.int64)


@pytest.mark.parametrize("file, content, message", [
    ("trainer_state.json", b'{"step": 8,', "not readable as this training loop's state"),
    ("trainer_state.json", b'{"step": "8", "sampler": {}}', "'step' must be a whole number"),
    ("trainer_state.json", lambda path: edited_state(path, lambda state: state.pop("skipped_steps")),
     "'skipped_steps' must be a whole number >= 0, got None"),
    ("trainer_state.json", lambda path: edited_state(path, lambda state: state.update(tokens_seen="many")),
     "'tokens_seen' must be a whole number >= 0, got 'many'"),
    ("trainer_state.json", lambda path: edited_state(path, lambda state: state.update(sampler={})),
     "'sampler.epoch' must be a whole number >= 0, got None"),
    ("rng_state_0.json", b"[1, 2]", "expected a JSON object (random-number generator states)"),
    ("rng_state_0.json", b"{}", "cannot restore Python's and NumPy's random states from it (KeyError: 'python')"),
    ("rng_state_0.pt", torch_bytes({"torch": torch.zeros(3, dtype=torch.uint8)}), "cannot restore torch's random states"),
    ("optimizer.pt", b"not a torch file" * 8, "not a state file this package wrote, or damaged"),
    ("optimizer.pt", bytes(range(256)) * 2, "not a state file this package wrote, or damaged"),  # torch: "Re-running..."
    ("optimizer.pt", torch_bytes([1, 2]), "not an optimizer state"),
    ("optimizer.pt", lambda path: edited_state(path, lambda state: state["param_groups"][0]["params"].pop()),
     "its parameter groups hold [%d] parameters, this model's [%d]"),
    ("optimizer.pt", lambda path: edited_state(path, first_moment_of_seven), "'exp_avg' of model."),
    ("optimizer.pt", lambda path: edited_state(path, first_moment_one_column_wider), "'exp_avg' of model."),
    ("optimizer.pt", lambda path: edited_state(path, first_moment_as_integers), "'exp_avg' of model."),
    ("trainer_state.json", lambda path: edited_state(path, lambda state: state.update(step=-1)),
     "'step' must be a whole number >= 0"),
    ("trainer_state.json", lambda path: edited_state(path, lambda state: state.update(elapsed_s=math.inf)),
     "'elapsed_s' must be a number >= 0, got inf"),
    ("scheduler.pt", torch_bytes({"foo": 1}), "cannot restore the learning-rate schedule from it (KeyError"),
])
def test_a_hand_edited_checkpoint_file_is_named_and_the_checkpoint_kept(assets, reference_run, tmp_path, capsys,
                                                                        file, content, message):
    """Edited behind our back, with a manifest written again to match: resuming names the file, and changes nothing
    (a wrong-shaped Adam moment would reach the fused Adam kernel, which writes past it). The run's log stays."""
    import shutil

    checkpoint = tmp_path / "edited"
    shutil.copytree(reference_run / "checkpoint-8", checkpoint)
    if callable(content):
        content = content(checkpoint / file)
    if "%d" in message:
        count = len(torch.load(reference_run / "checkpoint-8" / file, weights_only=True)["param_groups"][0]["params"])
        message = message % (count - 1, count)
    (checkpoint / file).write_bytes(content)
    ckpt.write_manifest(checkpoint, 8)
    before = {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}
    assert training.main(run_args(assets, tmp_path / "out", resume_from_checkpoint=str(checkpoint))) == 1
    error = capsys.readouterr().err
    assert str(checkpoint / file) in error and message in error, error
    assert "Traceback" not in error and "weights_only=False" not in error and "Resumed from" not in error
    assert {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("saved_world_size", [2, 0])
def test_a_checkpoint_of_another_number_of_processes_is_refused(assets, reference_run, tmp_path, capsys,
                                                                saved_world_size):
    """Written by more (or, edited, fewer) processes than resume it: the data order and the random streams would
    change. Refused, naming the checkpoint, before anything is restored."""
    checkpoint = tmp_path / "other-world"
    shutil.copytree(reference_run / "checkpoint-8", checkpoint)
    state_file = checkpoint / ckpt.TRAINER_STATE_NAME
    state_file.write_bytes(edited_state(state_file, lambda state: state.update(world_size=saved_world_size)))
    ckpt.write_manifest(checkpoint, 8)
    assert training.main(run_args(assets, tmp_path / "out", resume_from_checkpoint=str(checkpoint))) == 1
    error = capsys.readouterr().err
    assert f"{checkpoint} was written by {saved_world_size} processes; resuming with 1" in error, error
    assert "Resumed from" not in error


def test_averaging_skips_a_damaged_checkpoint_naming_it(reference_run, tmp_path, caplog):
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(reference_run, output_dir)
    weights = output_dir / "checkpoint-8" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        assert [p.name for p in ckpt.last_checkpoints(output_dir, 3)] == ["checkpoint-4", "checkpoint-12"]
    assert "Skipping incomplete checkpoint" in caplog.text and "checkpoint-8" in caplog.text


def test_resuming_a_finished_run_writes_no_record_twice(assets, tmp_path):
    """The final validation comes before the last checkpoint, the averaged model's after it: resuming from it runs
    the latter again, and the log keeps exactly what the checkpoint had seen, so each record is there once."""
    output_dir = tmp_path / "finished"
    args = run_args(assets, output_dir, max_steps=8, eval_steps=4, average_checkpoints=2)
    assert training.main(args) == 0
    first = read_log(output_dir)
    assert training.main(args + ["--resume_from_checkpoint", "latest"]) == 0
    records = read_log(output_dir)
    summary = [(r["type"], r["step"], r.get("averaged", False)) for r in records]
    assert summary == [(r["type"], r["step"], r.get("averaged", False)) for r in first], summary
    assert [s for s in summary if s[0] == "eval"] == [("eval", 4, False), ("eval", 8, False), ("eval", 8, True)]


@pytest.mark.slow
@pytest.mark.parametrize("first_steps", [6, 8])  # off and on the saving schedule
def test_a_finished_run_continued_to_more_steps_ends_as_a_run_never_interrupted(assets, tmp_path, first_steps):
    """Continued with a larger max_steps (or after a time-budget stop), a run keeps the validations it made, keeps
    and averages the checkpoints a run never interrupted keeps and averages (not the first run's last one, off the
    schedule), and ends with the same weights."""
    settings = dict(max_steps=12, eval_steps=4, save_total_limit=3, average_checkpoints=3)
    assert training.main(run_args(assets, tmp_path / "once", **settings)) == 0
    continued = tmp_path / "continued"
    assert training.main(run_args(assets, continued, **{**settings, "max_steps": first_steps})) == 0
    assert training.main(run_args(assets, continued, **settings, resume_from_checkpoint="latest")) == 0

    def evaluations(folder):
        return [(r["step"], r.get("averaged", False)) for r in read_log(folder) if r["type"] == "eval"]

    scheduled = [e for e in evaluations(continued) if e != (6, False)]  # the first run's last validation stays
    assert scheduled == evaluations(tmp_path / "once") == [(4, False), (8, False), (12, False), (12, True)]
    assert [p.name for _, p in ckpt.list_checkpoints(continued)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    for folder in (continued, tmp_path / "once"):
        averaged = json.loads((folder / "eval_results.json").read_text())["averaged_checkpoints"]
        assert [Path(path).name for path in averaged] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert_same_weights(continued, tmp_path / "once", atol=0)


def test_a_resume_with_another_save_steps_keeps_the_earlier_schedules_checkpoints(assets, tmp_path, caplog):
    """A checkpoint is an earlier run's off-schedule last one by the --save_steps it was written under: judged by the
    resumed run's, checkpoints 4 and 8 (save_steps 4, resumed with 3) were deleted as superseded and left out of
    the average ("only 2 complete ones exist")."""
    output_dir = tmp_path / "run"
    settings = dict(save_total_limit=5, average_checkpoints=5)
    assert training.main(run_args(assets, output_dir, max_steps=8, save_steps=4, **settings)) == 0
    assert training.main(run_args(assets, output_dir, max_steps=12, save_steps=3, resume_from_checkpoint="latest",
                                  **settings)) == 0
    assert [p.name for _, p in ckpt.list_checkpoints(output_dir)] == [
        "checkpoint-4", "checkpoint-8", "checkpoint-9", "checkpoint-12"]
    averaged = json.loads((output_dir / "eval_results.json").read_text())["averaged_checkpoints"]
    assert [Path(path).name for path in averaged] == ["checkpoint-4", "checkpoint-8", "checkpoint-9", "checkpoint-12"]


def test_a_run_killed_between_its_last_checkpoint_and_the_rotation_rotates_when_resumed(assets, tmp_path):
    """Killed after its last checkpoint was renamed into place but before the older ones beyond save_total_limit
    were deleted (here: a run that kept all three), a run resumed there trains nothing and saves nothing, and still
    leaves only the last save_total_limit checkpoints."""
    output_dir = tmp_path / "run"
    assert training.main(run_args(assets, output_dir, save_total_limit=4)) == 0
    assert [p.name for _, p in ckpt.list_checkpoints(output_dir)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert training.main(run_args(assets, output_dir, save_total_limit=2, resume_from_checkpoint="latest")) == 0
    assert [p.name for _, p in ckpt.list_checkpoints(output_dir)] == ["checkpoint-8", "checkpoint-12"]


def test_resuming_past_max_steps_says_that_nothing_is_trained(assets, reference_run, tmp_path, caplog):
    output_dir = tmp_path / "lower"
    args = run_args(assets, output_dir, max_steps=8, resume_from_checkpoint=str(reference_run / "checkpoint-12"))
    assert training.main(args) == 0
    assert "Resumed at step 12, past max_steps (8): no step is trained, and the final model is the checkpoint's" in caplog.text
    assert_same_weights(output_dir, reference_run / "checkpoint-12")
    # Resumed in its own folder with averaging, the final model is the average, as the warning now says (it said
    # "the checkpoint's").
    shutil.copytree(reference_run, tmp_path / "again")
    caplog.clear()
    args = run_args(assets, tmp_path / "again", max_steps=8, average_checkpoints=2, resume_from_checkpoint="latest")
    assert training.main(args) == 0
    assert (f"no step is trained, and the final model averages the last 2 checkpoints of {tmp_path / 'again'} "
            "(average_checkpoints)") in caplog.text
    averaged = json.loads((tmp_path / "again" / "eval_results.json").read_text())["averaged_checkpoints"]
    assert [Path(path).name for path in averaged] == ["checkpoint-8", "checkpoint-12"]


def test_resume_with_another_model_size_names_the_checkpoint_and_the_weight(assets, reference_run, tmp_path, capsys):
    before = sorted(p.name for p in reference_run.iterdir())
    checkpoint = reference_run / "checkpoint-12"
    args = run_args(assets, tmp_path / "wider", resume_from_checkpoint=str(checkpoint), model_overrides={"d_model": 48})
    assert training.main(args) == 1
    error = capsys.readouterr().err
    assert (f"{checkpoint} holds another model than this run builds (config.json: d_model: {TINY_MODEL['d_model']} "
            "there, 48 now). Resume with the model settings (model_config, model_overrides)") in error, error
    # Weights of the same shapes, another model: it would be trained as that model, and averaged with the earlier.
    args = run_args(assets, tmp_path / "gelu", resume_from_checkpoint=str(checkpoint),
                    model_overrides={"activation_function": "gelu", "scale_embedding": False})
    assert training.main(args) == 1
    error = capsys.readouterr().err
    assert "(config.json: activation_function: 'relu' there, 'gelu' now; scale_embedding: True there, False now)" in error
    assert not (tmp_path / "gelu" / "model.safetensors").exists()
    assert sorted(p.name for p in reference_run.iterdir()) == before
    # A file of the wrong shape still names the weight (load_weights, behind the config check).
    with pytest.raises(ckpt.CheckpointError, match=r"src: weights do not fit the model: w is \(3,\) there and \(2,\) here"):
        training.load_weights(torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.zeros(2))}), {"w": torch.zeros(3)}, "src")


def test_resuming_with_other_data_settings_names_them(assets, reference_run, tmp_path, capsys, monkeypatch, caplog):
    """The data order would continue, silently, on other data (the language pair swapped, another file)."""
    checkpoint = reference_run / "checkpoint-12"
    for change, named in [(dict(source_lang="de", target_lang="en"), "source_lang: 'en' there, 'de' now; target_lang"),
                          (dict(max_source_length=20), "max_source_length: 32 there, 20 now")]:
        assert training.main(run_args(assets, tmp_path / "other", resume_from_checkpoint=str(checkpoint), **change)) == 1
        error = capsys.readouterr().err
        assert f"{checkpoint} was trained on other data ({named}" in error, error
    # A training file given by another path is taken as moved (a job's new scratch folder), with a warning; the
    # same file written another way passes in silence.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.tsv").write_text("en\tde\n")
    (tmp_path / "saved" / ckpt.TRAINER_STATE_NAME).parent.mkdir()
    (tmp_path / "saved" / ckpt.TRAINER_STATE_NAME).write_text(
        json.dumps({"config": {"train_file": "pairs.tsv", "source_lang": "en"}}))
    with caplog.at_level("WARNING"):
        training.check_same_data(tmp_path / "saved", training.TrainingConfig(train_file=str(tmp_path / "pairs.tsv")))
        assert "Taken as the same data" not in caplog.text
        training.check_same_data(tmp_path / "saved", training.TrainingConfig(train_file="/scratch/job2/pairs.tsv"))
    assert "on train_file '/scratch/job2/pairs.tsv'; the checkpoint was trained on 'pairs.tsv'" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match=r"\(source_lang: 'en' there, 'fr' now\)"):
        training.check_same_data(tmp_path / "saved", training.TrainingConfig(train_file="moved.tsv", source_lang="fr"))


def test_resuming_on_other_pairs_of_the_same_count_is_refused(assets, tmp_path, capsys):
    """The settings and the number of pairs were compared, not the pairs: the file rewritten with other text (or
    moved, and another file put in its place) resumed in silence. A fingerprint of the tokenized pairs is."""
    from modeling_seq2seq.data import builtin_task

    pairs = builtin_task()["train"]
    data = tmp_path / "train.jsonl"

    def write(rows):
        data.write_text("".join(json.dumps({"translation": {"en": pairs[i]["source"], "de": pairs[i]["target"]}}) + "\n"
                                for i in rows), encoding="utf-8")

    write(range(200))
    long = dict(max_source_length=64, max_target_length=64)  # none filtered: the same count of pairs
    output_dir = tmp_path / "run"
    assert training.main(run_args(assets, output_dir, train_file=str(data), max_steps=4, **long)) == 0
    write(range(200, 400))
    assert training.main(run_args(assets, output_dir, train_file=str(data), max_steps=8,
                                  resume_from_checkpoint="latest", **long)) == 1
    assert (f"{output_dir / 'checkpoint-4'} was trained on other data: this run's training pairs, as tokenized, are not "
            "the ones it trained on (their text or order differs)") in capsys.readouterr().err
    assert [p.name for _, p in ckpt.list_checkpoints(output_dir)] == ["checkpoint-4"]
    write(range(190))  # fewer pairs: named as such (the fingerprint is checked before the sampler's count)
    assert training.main(run_args(assets, output_dir, train_file=str(data), max_steps=8,
                                  resume_from_checkpoint="latest", **long)) == 1
    assert "(200 pairs there, 190 now: the file, the filters or max_train_samples)" in capsys.readouterr().err
    write(range(200))  # the same pairs again (moved back): resumed
    assert training.main(run_args(assets, output_dir, train_file=str(data), max_steps=8,
                                  resume_from_checkpoint="latest", **long)) == 0


def test_resume_keeps_the_checkpoints_tokenizer(assets, reference_run, tmp_path, capsys, caplog):
    """Another tokenizer, even of the same size, would renumber the text the weights learned: refused, naming both.
    The run's own tokenizer given again passes; a changed --vocab_size is ignored with a word."""
    from modeling_seq2seq.data import builtin_task
    from modeling_seq2seq.tokenization import load_tokenizer, save_tokenizer, train_tokenizer

    checkpoint = reference_run / "checkpoint-12"
    train = builtin_task()["train"].select(range(600, 1200))
    other = tmp_path / "other-tokenizer"
    save_tokenizer(train_tokenizer(list(train["target"]) + list(train["source"]), vocab_size=300), other)
    args = run_args(assets, tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), tokenizer=str(other))
    assert training.main(args) == 1
    error = capsys.readouterr().err
    assert f"--tokenizer {other} is not the tokenizer {checkpoint} was trained with (their vocabularies differ: 300 " \
           "tokens each, numbered differently)" in error, error
    assert not (tmp_path / "resumed" / "model.safetensors").exists()

    trainer = training.Trainer.__new__(training.Trainer)
    trainer.resume_dir = checkpoint
    trainer.config = training.TrainingConfig(tokenizer=assets["tokenizer"])
    assert trainer.resumed_tokenizer().get_vocab() == load_tokenizer(assets["tokenizer"]).get_vocab()
    # A run that trained its own BPE, resumed with another --vocab_size.
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in os.listdir(checkpoint):
        if "token" in name or name == "special_tokens_map.json":
            (saved / name).write_bytes((checkpoint / name).read_bytes())
    (saved / ckpt.TRAINER_STATE_NAME).write_text(json.dumps({"config": {"tokenizer": None, "vocab_size": 300}}))
    trainer.resume_dir, trainer.config = saved, training.TrainingConfig(vocab_size=300)
    with caplog.at_level("WARNING"):
        trainer.resumed_tokenizer()
        assert "vocab_size" not in caplog.text
        trainer.config = training.TrainingConfig(vocab_size=8000)
        assert len(trainer.resumed_tokenizer()) <= 300
    assert f"Resuming {saved} with --vocab_size 8000: ignored, the run goes on with the tokenizer it trained" in caplog.text


def test_resume_follows_a_changed_learning_rate_schedule_and_says_so(assets, tmp_path, caplog):
    """So do Adam's settings: torch's `load_state_dict` restored the saved betas and epsilon, and the resumed run
    trained with those while eval_results.json recorded the new ones."""
    output_dir = tmp_path / "rescaled"
    assert training.main(run_args(assets, output_dir, max_steps=6, logging_steps=1)) == 0  # checkpoint-6 at the end
    with caplog.at_level("WARNING"):
        assert training.main(run_args(assets, output_dir, resume_from_checkpoint="latest", lr_scale=6.0, warmup_steps=20,
                                      logging_steps=1, adam_beta2=0.5, adam_epsilon=1e-3, weight_decay=0.01)) == 0
    assert "learning-rate schedule changed (warmup_steps 10 -> 20, scale 2.0 -> 6.0)" in caplog.text
    assert "the optimizer's settings changed (--adam_beta1/--adam_beta2 (0.9, 0.98) -> (0.9, 0.5), --adam_epsilon " \
           "1e-09 -> 0.001, --weight_decay 0 -> 0.01); the resumed run follows the new ones" in caplog.text
    last = ckpt.find_latest_checkpoint(output_dir)
    group = ckpt.load_torch_state(last / training.OPTIMIZER_NAME)["param_groups"][0]
    assert (tuple(group["betas"]), group["eps"], group["weight_decay"]) == ((0.9, 0.5), 1e-3, 0.01)
    assert group["decoupled_weight_decay"] is True  # AdamW's (Adam's state loaded into it), as configured
    logged = {r["step"]: r["lr"] for r in read_log(output_dir) if r["type"] == "train"}
    d_model = TINY_MODEL["d_model"]
    for step in range(1, 13):  # update k uses the schedule at k; from the first update after the checkpoint, the new one
        warmup, scale = (10, 2.0) if step <= 6 else (20, 6.0)  # run_args' warmup_steps, then the resumed run's
        assert logged[step] == pytest.approx(inverse_sqrt_lr(step, d_model, warmup, scale), rel=1e-6), step


def test_resume_latest_with_only_incomplete_checkpoints_says_so(assets, tmp_path, capsys):
    output_dir = tmp_path / "all_torn"
    assert training.main(run_args(assets, output_dir, max_steps=8)) == 0
    for _, path in ckpt.list_checkpoints(output_dir):
        (path / ckpt.MANIFEST_NAME).unlink()
    assert training.main(run_args(assets, output_dir, resume_from_checkpoint="latest")) == 1
    error = capsys.readouterr().err
    assert "none is complete" in error and "--overwrite_output_dir" in error
    assert "Pass --resume_from_checkpoint latest" not in error


def test_resuming_a_checkpoint_from_elsewhere_into_another_runs_folder_is_refused(assets, reference_run, tmp_path,
                                                                                 capsys):
    """Rotation and the final checkpoint averaging would take the folder's own checkpoints with the resumed run's."""
    import shutil

    other = tmp_path / "other_run"
    shutil.copytree(reference_run / "checkpoint-4", other / "checkpoint-2")
    before = sorted(p.name for p in other.iterdir())
    args = run_args(assets, other, resume_from_checkpoint=str(reference_run / "checkpoint-8"), average_checkpoints=3)
    assert training.main(args) == 1
    assert f"outside --output_dir '{other}', which holds checkpoints of another run (checkpoint-2)" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == before


def test_resuming_from_an_earlier_checkpoint_keeps_the_later_ones(assets, reference_run, tmp_path, capsys):
    """Going back to an earlier checkpoint of the same output directory would overwrite the later ones, and a later
    `latest` would jump back to them: refused, with the output directory left as it was."""
    import shutil

    output_dir = tmp_path / "copy"
    shutil.copytree(reference_run, output_dir)
    before = {p.relative_to(output_dir): p.read_bytes() for p in output_dir.rglob("*") if p.is_file()}
    assert training.main(run_args(assets, output_dir, resume_from_checkpoint=str(output_dir / "checkpoint-8"))) == 1
    error = capsys.readouterr().err
    assert "holds later complete checkpoints (checkpoint-12)" in error, error
    assert {p.relative_to(output_dir): p.read_bytes() for p in output_dir.rglob("*") if p.is_file()} == before
    # From the newest one, resuming is allowed as before.
    assert training.main(run_args(assets, output_dir, resume_from_checkpoint=str(output_dir / "checkpoint-12"))) == 0


def test_fresh_run_refuses_an_output_dir_holding_a_saved_model(assets, reference_run, tmp_path, capsys):
    """No checkpoints, but a model, an earlier run's files or a user's own: a new run would overwrite them (the final
    save writes many names), so it is refused, touching nothing, not even files named like our temporary ones."""
    import shutil

    def contents(folder):
        return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}

    output_dir = tmp_path / "model"
    output_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(reference_run / name, output_dir / name)
    before = contents(output_dir)
    assert training.main(run_args(assets, output_dir, max_steps=2)) == 1
    assert "is not empty (config.json, model.safetensors)" in capsys.readouterr().err
    assert contents(output_dir) == before
    assert training.main(run_args(assets, output_dir, max_steps=2, overwrite_output_dir=True)) == 0

    users = tmp_path / "users"
    (users / ".tmp-backup").mkdir(parents=True)
    (users / ".tmp-backup" / "old.txt").write_text("mine")
    for name in ("pipeline.py", "tokenizer.json", "notes.txt", ".trash-keep.txt", ".tmp-notes-12345678.txt",
                 ".tmp-notes-20261128"):  # the last two: a dash and 8 characters, as `mkstemp`'s names end
        (users / name).write_text(name)
    before = contents(users)
    assert training.main(run_args(assets, users, max_steps=2)) == 1
    assert ("is not empty (.tmp-backup, .tmp-notes-12345678.txt, .tmp-notes-20261128, .trash-keep.txt, notes.txt, "
            "pipeline.py, ...)") in capsys.readouterr().err
    assert {name: data for name, data in contents(users).items() if name != ".training.lock"} == before

    # Our own leftovers (a staging folder, an atomic write's temporary file of a process now gone) are removed once
    # a run goes ahead; a running process's temporary file is that process's (here, the folder is then not empty).
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    leftovers = tmp_path / "leftovers"
    (leftovers / ".tmp-checkpoint-5").mkdir(parents=True)
    (leftovers / f".tmp-training_log.jsonl-{gone}-ab12_x9z").write_text("{")
    (leftovers / f".tmp-eval_results.json-{gone}-ab12_x9z").write_text("{")
    (leftovers / ".tmp-write-probe-ab12_x9z").write_text("")  # the write probe's name before it had the process id
    assert training.main(run_args(assets, leftovers, max_steps=2)) == 0
    assert not any(p.name.startswith(".tmp-") for p in leftovers.iterdir())
    # A temporary file whose writer still runs is no user content either, but it is left to its writer; one whose
    # process id was taken again by a process started since (a restarted container's run) is a leftover.
    busy = tmp_path / "busy"
    busy.mkdir()
    running, reused = (busy / f".tmp-training_log.jsonl-{os.getpid()}-ab12_x9z",
                       busy / f".tmp-eval_results.json-{os.getpid()}-ab12_x9z")
    running.write_text("{")
    reused.write_text("{")
    os.utime(reused, (0, 0))  # written in 1970, long before this process started
    assert training.main(run_args(assets, busy, max_steps=2)) == 0
    assert running.exists() and not reused.exists()

    # A run killed before its first checkpoint leaves its tokenizer and log: `latest` starts it again from scratch.
    killed = tmp_path / "killed_early"
    (killed / training.TOKENIZER_DIR_NAME).mkdir(parents=True)
    (killed / training.TRACKER_RUN_NAME).mkdir()  # its TensorBoard events, where tensorboard is installed
    (killed / training.LOG_FILE_NAME).write_text('{"type": "train", "step": 1}\n')
    assert training.main(run_args(assets, killed, max_steps=2)) == 1
    error = capsys.readouterr().err
    assert "is not empty (tokenizer, train, training_log.jsonl)" in error
    assert "pass --resume_from_checkpoint latest to start it again there" in error
    assert training.main(run_args(assets, killed, max_steps=2, resume_from_checkpoint="latest")) == 0
    assert [r["step"] for r in read_log(killed) if r["type"] == "train"] == [2]

    # A run that stops on its data (every pair longer than the limit) leaves no tokenizer/ behind, so the corrected
    # run goes ahead in the same folder.
    stopped = tmp_path / "stopped_on_data"
    assert training.main(run_args(assets, stopped, max_steps=2, max_source_length=1, tokenizer=None, vocab_size=300)) == 1
    assert ("No training pairs left: 600 of the 600 read are longer than max_source_length=1 or "
            "max_target_length=32 tokens") in capsys.readouterr().err
    assert not (stopped / training.TOKENIZER_DIR_NAME).exists()
    # ... nor one that stops before its first step (more batches per update than pairs).
    too_many = run_args(assets, stopped, max_steps=2, tokenizer=None, vocab_size=300, gradient_accumulation_steps=10**6)
    assert training.main(too_many) == 1
    assert "too few for 1000000 batches per update" in capsys.readouterr().err
    assert not (stopped / training.TOKENIZER_DIR_NAME).exists()
    assert training.main(run_args(assets, stopped, max_steps=2, tokenizer=None, vocab_size=300)) == 0
    assert (stopped / training.TOKENIZER_DIR_NAME / "tokenizer.json").is_file()
    assert not (stopped / training.TOKENIZER_STAGING_NAME).exists()


def test_partly_random_or_damaged_weights_are_refused_by_name(reference_run, tmp_path):
    """transformers fills missing weights (or ones of another shape) with random values and only logs it; a damaged
    file fails deep inside safetensors. Loading a saved model names the folder and the problem instead."""
    import shutil

    from safetensors.torch import save_file

    cases = {}
    for name in ("partial", "reshaped", "truncated", "stray"):
        folder = cases[name] = tmp_path / name
        shutil.copytree(reference_run, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    full = weights(reference_run)
    save_file({k: v for k, v in full.items() if ".decoder." not in k}, str(cases["partial"] / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((reference_run / "config.json").read_text())
    (cases["reshaped"] / "config.json").write_text(json.dumps({**config, "decoder_ffn_dim": 2 * config["decoder_ffn_dim"]}))
    data = (reference_run / "model.safetensors").read_bytes()
    (cases["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    save_file({**full, "model.decoder.layers.7.fc1.weight": torch.zeros(2)}, str(cases["stray"] / "model.safetensors"),
              metadata={"format": "pt"})  # as if config.json said fewer layers than the weights hold
    for name, message in [("partial", "the weights do not fit the model its config.json describes (missing: ['model.decoder"),
                          ("reshaped", "some weights have other shapes than its config.json describes"),
                          ("truncated", "model.safetensors: cannot read the weights"),
                          ("stray", "the weights file holds tensors the model its config.json describes has no place "
                                    "for (model.decoder.layers.7.fc1.weight)")]:
        with pytest.raises(ValueError, match=re.escape(f"{cases[name]}{'/' if name == 'truncated' else ': '}{message}")):
            training.load_model_and_tokenizer(cases[name], device="cpu")
    # A checkpoint whose files no longer match its manifest, and NaN weights in a folder without one.
    flipped = tmp_path / "flipped"
    shutil.copytree(reference_run / "checkpoint-12", flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-64:-56] = b"\xff" * 8  # a NaN in the last tensor
    (flipped / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"{flipped}: model.safetensors does not match its sha256")):
        training.load_model_and_tokenizer(flipped, device="cpu")
    (flipped / ckpt.MANIFEST_NAME).unlink()
    with pytest.raises(ValueError, match=re.escape(f"{flipped}: the saved weights hold NaN or infinite values")):
        training.load_model_and_tokenizer(flipped, device="cpu")
    # An infinite weight, not only a NaN.
    last = sorted(full)[-1]
    save_file({**full, last: torch.full_like(full[last], math.inf)}, str(flipped / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(f"{flipped}: the saved weights hold NaN or infinite values ({last}")):
        training.load_model_and_tokenizer(flipped, device="cpu")
    # Half-precision weights (bfloat16, float16) are floating-point: they load.
    half_folder = tmp_path / "half"
    shutil.copytree(reference_run, half_folder, ignore=shutil.ignore_patterns("checkpoint-*", ckpt.MANIFEST_NAME))
    for half in (torch.bfloat16, torch.float16):
        save_file({name: tensor.to(half) for name, tensor in full.items()}, str(half_folder / "model.safetensors"),
                  metadata={"format": "pt"})
        model, _ = training.load_model_and_tokenizer(half_folder, device="cpu")
        assert torch.equal(model.state_dict()[last].float(), full[last].to(half).float())
    translate = load_script("translate")
    source = tmp_path / "in.txt"
    source.write_text("one\n")
    for name in ("partial", "flipped"):
        assert translate.main(["--model", str(cases.get(name, flipped)), "--input", str(source)]) == 1


def test_a_folder_of_another_model_type_a_broken_generation_config_or_a_foreign_tokenizer_is_refused_by_name(
        reference_run, tmp_path):
    """Each used to load and then fail deep inside transformers (or, for a generation_config.json that is not JSON,
    to be silently ignored); loading names the file and the problem instead."""
    import shutil

    from modeling_seq2seq.tokenization import load_tokenizer, save_tokenizer

    def variant(name):
        folder = tmp_path / name
        shutil.copytree(reference_run, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
        return folder

    config = json.loads((reference_run / "config.json").read_text())
    bart = variant("bart")
    (bart / "config.json").write_text(json.dumps({**config, "model_type": "bart"}))
    not_json, no_beams = variant("not_json"), variant("no_beams")
    (not_json / "generation_config.json").write_text("xx")
    settings = json.loads((reference_run / "generation_config.json").read_text())
    (no_beams / "generation_config.json").write_text(json.dumps({**settings, "num_beams": 0}))
    generation_cases = {"start": {"decoder_start_token_id": config["vocab_size"]}, "text": {"length_penalty": "0.6"},
                        "cold": {"do_sample": True, "temperature": 0.0}, "negative": {"pad_token_id": -1}}
    for name, change in generation_cases.items():
        (variant(name) / "generation_config.json").write_text(json.dumps({**settings, **change}))
    no_eos = variant("no_eos")
    tokenizer_config = json.loads((no_eos / "tokenizer_config.json").read_text())
    (no_eos / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "eos_token": None}))
    other_eos = variant("other_eos")
    (other_eos / "config.json").write_text(json.dumps({**config, "eos_token_id": config["vocab_size"] - 1}))
    heads = variant("heads")
    (heads / "config.json").write_text(json.dumps({**config, "encoder_attention_heads": 7}))
    foreign = variant("foreign")
    tokenizer = load_tokenizer(reference_run)
    tokenizer.add_tokens([f"extra{i}" for i in range(config["vocab_size"])])
    save_tokenizer(tokenizer, foreign)
    other_pad = variant("other_pad")
    (other_pad / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "pad_token": "<unk>"}))
    unknown_pad = variant("unknown_pad")
    (unknown_pad / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "pad_token": "<nonexistent>"}))
    long_text = variant("long_text")
    (long_text / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": "long"}))
    no_tokenizer_config = variant("no_tokenizer_config")
    (no_tokenizer_config / "tokenizer_config.json").unlink()
    integers = variant("integers")
    weights = load_file(str(integers / "model.safetensors"))
    first = sorted(weights)[0]
    save_file({**weights, first: weights[first].long()}, str(integers / "model.safetensors"))
    torn_index = variant("torn_index")
    (torn_index / ckpt.SHARD_INDEX_NAME).write_text('{"weight_map": ')
    for folder, message in [
        (bart, f"{bart / 'config.json'} says model_type 'bart', not 'seq2seq_transformer'"),
        (torn_index, f"{torn_index / ckpt.SHARD_INDEX_NAME}: not readable as a JSON index of weight shards"),
        (other_pad, f"{other_pad}: the tokenizer's pad_token_id is 3, config.json's 0: the tokenizer and the model do "
                    "not belong together"),
        (long_text, f"{long_text / 'tokenizer_config.json'}: 'model_max_length' must be a number above 0, got 'long'"),
        (unknown_pad, f"{unknown_pad / 'tokenizer_config.json'}: its pad_token '<nonexistent>' is not in the vocabulary "
                      f"of {unknown_pad / 'tokenizer.json'}"),
        (no_tokenizer_config, f"{no_tokenizer_config / 'tokenizer_config.json'} is missing: it names the tokenizer's "
                              "special tokens"),
        (integers, f"{integers / 'model.safetensors'}: weights must be floating-point, and {first} (I64) are not"),
        (heads, f"{heads / 'config.json'}: Seq2SeqTransformerConfig.encoder_attention_heads=7 is invalid: expected a "
                "divisor of d_model"),
        (not_json, f"{not_json / 'generation_config.json'}: not readable as JSON generation settings"),
        (no_beams, f"{no_beams / 'generation_config.json'}: 'num_beams' must be an integer >= 1, got 0"),
        (tmp_path / "start", f"'decoder_start_token_id' must be a token id from 0 to {config['vocab_size'] - 1}"),
        (tmp_path / "text", f"{tmp_path / 'text' / 'generation_config.json'}: 'length_penalty' must be a finite number, "
                            "got '0.6'"),
        (tmp_path / "cold", "sampling ('do_sample': true) needs a 'temperature' above 0, got 0.0"),
        (tmp_path / "negative", f"'pad_token_id' must be a token id from 0 to {config['vocab_size'] - 1} (or a list of "
                                "them), got -1"),
        (other_eos, f"{other_eos}: the tokenizer's eos_token_id is {config['eos_token_id']}, config.json's "
                    f"{config['vocab_size'] - 1}: the tokenizer and the model do not belong together"),
        (no_eos, f"{no_eos}: the tokenizer has no eos_token"),
        (foreign, f"{foreign}: its tokenizer has {2 * config['vocab_size']} tokens (ids up to {2 * config['vocab_size'] - 1}), "
                  f"but the model only {config['vocab_size']}"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
            training.load_model_and_tokenizer(folder, device="cpu")
    # The export and the Hub folder load it the same way (the tokenizer after the model).
    from modeling_seq2seq.export import export_saved_model
    from modeling_seq2seq.hub import build_hub_folder

    for folder, message in [(not_json, "not readable as JSON generation settings"), (integers, "(I64) are not"),
                            (other_pad, "the tokenizer's pad_token_id is 3, config.json's 0")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            export_saved_model(folder, tmp_path / "ct2")
        with pytest.raises(ValueError, match=re.escape(message)):
            build_hub_folder(folder, tmp_path / "hub")
        assert not (tmp_path / "ct2").exists() and not (tmp_path / "hub").exists()


def test_loading_a_checkpoint_for_inference_hashes_what_it_reads_only(reference_run, tmp_path, monkeypatch):
    """The optimizer state (2x the weights) is never read by `from_pretrained`: loading a checkpoint as a model checks
    its size but not its sha256, which resuming still checks; the model's own files are hashed as before."""
    import shutil

    folder = tmp_path / "checkpoint"
    shutil.copytree(reference_run / "checkpoint-12", folder)
    hashed = []
    real_sha256 = ckpt.sha256_of
    monkeypatch.setattr(ckpt, "sha256_of", lambda path: hashed.append(Path(path).name) or real_sha256(path))
    optimizer = folder / training.OPTIMIZER_NAME
    data = bytearray(optimizer.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])
    optimizer.write_bytes(bytes(data))
    model, _ = training.load_model_and_tokenizer(folder, device="cpu")
    assert torch.equal(model.lm_head.weight, weights(folder)["model.shared.weight"])
    assert "model.safetensors" in hashed and "config.json" in hashed
    assert not any(ckpt.is_training_state(name) for name in hashed)
    assert ckpt.verify_checkpoint(folder) == f"{training.OPTIMIZER_NAME} does not match its sha256 in the manifest (corrupted)"
    optimizer.write_bytes(bytes(data[:-1]))
    with pytest.raises(ValueError, match=re.escape(f"{folder}: {training.OPTIMIZER_NAME} has {len(data) - 1} bytes")):
        training.load_model_and_tokenizer(folder, device="cpu")


@pytest.fixture
def ctrl_c_enabled():
    """Ctrl-C as in a terminal. A test run started in the background by a shell (`cmd &`, nohup) ignores SIGINT, and
    so, on purpose, do training runs started from it (and their subprocesses, which inherit the disposition)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.usefixtures("ctrl_c_enabled")
@pytest.mark.parametrize("stop, code, word", [(signal.SIGINT, 130, "Interrupted"), (signal.SIGTERM, 143, "Terminated")])
def test_ctrl_c_or_sigterm_names_the_checkpoint_to_resume_from(assets, tmp_path, stop, code, word):
    """Ctrl-C, or a scheduler's SIGTERM: no traceback, the conventional exit code, and where to resume from."""
    output_dir = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), *run_args(assets, output_dir, max_steps=5000)],
                               env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    # Any checkpoint will do: with save_total_limit=3 a given one lives ~0.2 s, which a busy machine's poll can miss.
    while not any(output_dir.glob("checkpoint-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before a checkpoint was seen"
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-2000:]
    message = [line for line in stderr.split("\n") if f"{word}: the last complete checkpoint is" in line]
    assert len(message) == 1 and message[0].startswith(word), f"on a line of its own, not after the progress bar: {message}"
    assert "--resume_from_checkpoint latest" in stderr and "Traceback" not in stderr


@pytest.mark.usefixtures("ctrl_c_enabled")
@pytest.mark.parametrize("stop, code, word", [(signal.SIGINT, 130, "Interrupted"), (signal.SIGTERM, 143, "Terminated")])
def test_a_stop_signal_whose_exception_is_swallowed_still_stops_the_run(assets, tmp_path, monkeypatch, capsys, stop, code, word):
    """A signal's exception raised inside a `__del__` or a library's catch-all never reaches the run: the training
    loop raises the stop again at its next step instead of training on."""
    output_dir = tmp_path / "swallowed"
    real_step = training.Trainer.train_step

    def step_that_swallows_a_signal(self, batches):
        if self.step == 5:
            try:
                signal.raise_signal(stop)
                time.sleep(0.1)  # the handler runs here, between bytecodes
            except BaseException:
                pass
        return real_step(self, batches)

    monkeypatch.setattr(training.Trainer, "train_step", step_that_swallows_a_signal)
    assert training.main(run_args(assets, output_dir)) == code
    assert f"{word}: the last complete checkpoint is {output_dir / 'checkpoint-4'}" in capsys.readouterr().err
    assert not (output_dir / "checkpoint-8").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert training.main(run_args(assets, tmp_path / "again", max_steps=2, save_steps=0)) == 0  # nothing left pending


def test_a_distributed_write_stopped_by_ctrl_c_leaves_no_staging(tmp_path):
    """The several-process write (`_save_distributed`, run here in one process) removed its staging folder on an
    error, not when Ctrl-C or SIGTERM stopped it."""
    import types

    from accelerate import Accelerator

    trainer = types.SimpleNamespace(accelerator=Accelerator(cpu=True), is_main=True, output_dir=tmp_path)

    def stopped_midway(staging):
        (staging / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training.Trainer._save_distributed(trainer, 4, stopped_midway, lambda staging: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume(assets, reference_run, tmp_path):
    """Kill a run at a random moment of its training (seeded; the seed is printed on failure), resume: same weights.

    The kill comes a random 0-1.5 s after the first checkpoint appears, so it lands in later steps, checkpoint
    writes, rotation or the final save rather than in the interpreter's start-up.
    """
    output_dir = tmp_path / "random_kill"
    seed = int(os.environ.get("KILL_SEED", random.randrange(10**6)))
    delay = random.Random(seed).uniform(0.0, 1.5)
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), *run_args(assets, output_dir)],
                               env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (output_dir / "checkpoint-4").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode in (0, -signal.SIGKILL), f"the run failed on its own (exit {process.returncode})"
    assert training.main(run_args(assets, output_dir, resume_from_checkpoint="latest")) == 0, f"KILL_SEED={seed}"
    assert_same_weights(output_dir, reference_run)


def test_a_continued_run_killed_before_its_first_record_keeps_the_log(assets, reference_run, tmp_path, monkeypatch):
    """Continuing a finished run cuts the log back to its last checkpoint (the later records are written again); cut
    at the start, a kill before any new record lost the finished run's final validation and test records."""
    import shutil

    output_dir = tmp_path / "continued"
    shutil.copytree(reference_run, output_dir)
    before = (output_dir / training.LOG_FILE_NAME).read_text()
    assert '"type": "test"' in before
    monkeypatch.setattr(training.Trainer, "train_steps", lambda self, stream, progress: (_ for _ in ()).throw(SystemExit(137)))
    with pytest.raises(SystemExit):
        training.main(run_args(assets, output_dir, max_steps=16, resume_from_checkpoint="latest"))
    assert (output_dir / training.LOG_FILE_NAME).read_text() == before


def test_a_final_save_killed_part_way_leaves_no_model_that_mixes_two(assets, reference_run, tmp_path, monkeypatch):
    """The final model's files move in one by one over the earlier model's, config.json last. Killed after the new
    weights were in, the earlier config.json (and results) stayed beside them: a model that loaded, and translated
    nonsense where the two differ. The earlier config goes first now: the folder loads as no model until resuming
    saves it again."""
    import shutil

    output_dir = tmp_path / "continued"
    shutil.copytree(reference_run, output_dir)
    real_replace = os.replace

    def killed_after_the_weights(source, target):
        real_replace(source, target)
        if Path(target) == output_dir / "model.safetensors":
            raise SystemExit(137)

    monkeypatch.setattr(training.os, "replace", killed_after_the_weights)
    with pytest.raises(SystemExit):
        training.main(run_args(assets, output_dir, max_steps=16, resume_from_checkpoint="latest"))
    monkeypatch.undo()
    assert not (output_dir / "config.json").exists() and not (output_dir / training.EVAL_RESULTS_NAME).exists()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        training.load_model_and_tokenizer(output_dir, device="cpu")
    assert training.main(run_args(assets, output_dir, max_steps=16, resume_from_checkpoint="latest")) == 0
    assert_same_weights(output_dir, output_dir / "checkpoint-16", atol=0)
    training.load_model_and_tokenizer(output_dir, device="cpu")


def test_a_run_chooses_its_device_afresh_after_a_cpu_only_accelerator(assets, tmp_path, monkeypatch):
    """Accelerate keeps its device choice process-wide: an earlier `Accelerator(cpu=True)` in the process (a notebook
    cell, a Trainer with `use_cpu`) would keep a later run off the GPU unless the run forgets it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    monkeypatch.delenv("ACCELERATE_USE_CPU")
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        Accelerator(cpu=True)
        assert PartialState()._cpu  # the choice a run must not inherit
        assert training.main(run_args(assets, tmp_path / "run", max_steps=2, save_steps=0)) == 0
        assert not PartialState()._cpu
        assert PartialState().device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_unwritable_output_dir_fails_before_training(assets, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    started = time.monotonic()
    assert training.main(run_args(assets, blocker / "out")) == 1
    error = capsys.readouterr().err
    assert f"Output directory '{blocker / 'out'}' is not writable" in error
    assert time.monotonic() - started < 30


def test_failing_save_names_the_path_and_keeps_the_previous_checkpoint(assets, tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "disk_full"
    real_save = ckpt.save_torch_state

    def disk_full_at_step_8(state, path):
        if "checkpoint-8" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, path)

    monkeypatch.setattr(ckpt, "save_torch_state", disk_full_at_step_8)
    assert training.main(run_args(assets, output_dir)) == 1
    error = capsys.readouterr().err
    assert f"Could not write checkpoint '{output_dir / 'checkpoint-8'}'" in error and "No space left" in error
    assert f"previous checkpoint '{output_dir / 'checkpoint-4'}' is intact" in error
    assert [p.name for _, p in ckpt.list_checkpoints(output_dir)] == ["checkpoint-4"]
    assert ckpt.verify_checkpoint(output_dir / "checkpoint-4") is None
    assert not [p for p in output_dir.iterdir() if p.name.startswith(".tmp-")]
    # torch.save says a full disk in its own words: the free space is named (a review filled a 40 MB tmpfs).
    def torch_on_a_full_disk(state, path):
        if "checkpoint-8" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1060096 vs 1059988")
        real_save(state, path)

    monkeypatch.setattr(ckpt, "save_torch_state", torch_on_a_full_disk)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage._replace(free=3 * 2**20))
    assert training.main(run_args(assets, tmp_path / "torch_full")) == 1
    assert ("unexpected pos 1060096 vs 1059988 (the disk holding it has 3 MB free: probably full). The previous "
            "checkpoint") in capsys.readouterr().err
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage._replace(free=usage.total // 2))
    assert training.main(run_args(assets, tmp_path / "torch_error")) == 1
    assert "unexpected pos 1060096 vs 1059988. The previous checkpoint" in capsys.readouterr().err


def test_an_output_folder_that_turns_read_only_mid_run_ends_with_one_error_line(assets, tmp_path, monkeypatch, capsys):
    """A failed log write or checkpoint, then the lock file that cannot be deleted either: two chained tracebacks
    ended in an error about the lock file (a review mounted the folder read-only). Now one line names what failed."""
    import builtins
    import pathlib

    read_only = {"on": False}
    real_unlink, real_open, real_save = pathlib.Path.unlink, builtins.open, ckpt.save_torch_state

    def unlink(path, *args, **kwargs):
        if read_only["on"]:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_unlink(path, *args, **kwargs)

    def open_log(file, mode="r", *args, **kwargs):
        if read_only["on"] and "a" in mode:
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    def save(state, path):
        if "checkpoint-8" in str(path):
            read_only["on"] = True
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real_save(state, path)

    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    monkeypatch.setattr(training, "open", open_log, raising=False)  # the training log's appends
    for case, output_dir in (("checkpoint", tmp_path / "at_save"), ("log", tmp_path / "at_log")):
        read_only["on"] = False
        if case == "checkpoint":
            monkeypatch.setattr(ckpt, "save_torch_state", save)
        else:
            monkeypatch.setattr(ckpt, "save_torch_state", real_save)
            real_write = training.JsonlLog.write
            monkeypatch.setattr(training.JsonlLog, "write", lambda log, record: (
                read_only.update(on=read_only["on"] or record.get("step", 0) > 6), real_write(log, record))[1])
        assert training.main(run_args(assets, output_dir)) == 1
        error = capsys.readouterr().err
        assert "Traceback" not in error and ckpt.LOCK_NAME not in error, error
        if case == "checkpoint":
            assert f"Could not write checkpoint '{output_dir / 'checkpoint-8'}'" in error
        else:
            assert (f"error: Could not write the training log '{output_dir / training.LOG_FILE_NAME}' (Read-only file "
                    "system); the checkpoints written before are complete.") in error
        assert [p.name for _, p in ckpt.list_checkpoints(output_dir)] == ["checkpoint-4"]


def nan_injector(bad_calls):
    """A compute_loss that returns NaN on the given (0-based) calls and checks no update happened after one."""
    state = {"calls": 0, "snapshot": None, "unchanged_after_bad": []}
    real = training.compute_loss

    def compute_loss(model, batch):
        call = state["calls"]
        state["calls"] += 1
        params = [p.detach().clone() for p in model.parameters()]
        if state["snapshot"] is not None:
            state["unchanged_after_bad"].append(all(torch.equal(a, b) for a, b in zip(state["snapshot"], params)))
            state["snapshot"] = None
        loss = real(model, batch)
        if bad_calls(call):
            state["snapshot"] = params
            return loss * float("nan")
        return loss

    return compute_loss, state


def test_nan_steps_are_skipped_and_counted(assets, tmp_path, monkeypatch):
    fake, state = nan_injector(lambda call: call in (3, 4))
    monkeypatch.setattr(training, "compute_loss", fake)
    output_dir = tmp_path / "nan"
    assert training.main(run_args(assets, output_dir, max_consecutive_bad_steps=3)) == 0
    results = json.loads((output_dir / training.EVAL_RESULTS_NAME).read_text())
    assert results["skipped_steps"] == 2 and results["step"] == 12
    assert state["calls"] == 14 and state["unchanged_after_bad"] == [True, True]
    assert all(torch.isfinite(t).all() for t in weights(output_dir).values())
    skipped = [r for r in read_log(output_dir) if r["type"] == "skipped"]
    assert [(r["step"], r["consecutive"], r["loss"]) for r in skipped] == [(3, 1, "nan"), (3, 2, "nan")]


def test_too_many_bad_steps_stop_training_and_keep_last_good_checkpoint(assets, tmp_path, monkeypatch, capsys):
    fake, _ = nan_injector(lambda call: call >= 6)
    monkeypatch.setattr(training, "compute_loss", fake)
    output_dir = tmp_path / "diverged"
    assert training.main(run_args(assets, output_dir, max_consecutive_bad_steps=3)) == 3
    error = capsys.readouterr().err
    assert "3 consecutive steps with a non-finite loss" in error and "after step 6" in error
    assert f"last good checkpoint is {output_dir / 'checkpoint-4'}" in error
    assert [p.name for _, p in ckpt.list_checkpoints(output_dir)] == ["checkpoint-4"]
    assert not (output_dir / "model.safetensors").exists(), "no final model from a diverged run"


def test_a_run_shorter_than_its_warm_up_says_so(assets, tmp_path, caplog):
    """Without --config, data files get the base recipe's 4,000 warm-up steps: a short run never reached the peak
    learning rate, without a word (its outputs were one word repeated)."""
    with caplog.at_level("WARNING"):
        assert training.main(run_args(assets, tmp_path / "short", max_steps=2, warmup_steps=4000, save_steps=0)) == 0
    lr = 2.0 * 32**-0.5 * 2 * 4000**-1.5  # lr_scale * d_model^-0.5 * step * warmup^-1.5 (TINY_MODEL: d_model 32)
    assert f"max_steps (2) ends before the warm-up (warmup_steps 4000): the learning rate never reaches its peak " \
           f"({lr:.2e} at the last step)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert training.main(run_args(assets, tmp_path / "long", max_steps=2, warmup_steps=2, save_steps=0)) == 0
    assert "ends before the warm-up" not in caplog.text


def test_more_beams_than_tokens_are_refused_before_training(assets, tmp_path, capsys):
    for option in ("num_beams", "eval_num_beams"):
        assert training.main(run_args(assets, tmp_path / option, **{option: 100000})) == 1
        assert f"{option} 100000: more beams than the tokenizer has tokens (300)" in capsys.readouterr().err
        assert not ckpt.list_checkpoints(tmp_path / option)


def test_validation_pairs_over_the_length_limits_are_kept_and_named(assets, tmp_path, caplog):
    """Training leaves out pairs over max_source_length/max_target_length; validation keeps them (leaving them out
    would flatter the scores), but says how many there are and which, as a very long one slows every validation."""
    with caplog.at_level("WARNING"):
        assert training.main(run_args(assets, tmp_path / "run", max_steps=1, max_source_length=12,
                                      max_target_length=12, save_steps=0)) == 0
    warning = re.search(r"(\d+) validation pair\(s\) longer than max_source_length=12 or max_target_length=12 tokens "
                        r"are kept .*: pair (\d+) \('(.*?)'\.\.\., (\d+) tokens\)", caplog.text)
    assert warning is not None, caplog.text
    assert int(warning[1]) > 0 and int(warning[4]) > 12 + 2


def test_wall_clock_budget_stops_saves_and_evaluates(assets, tmp_path):
    output_dir = tmp_path / "budget"
    assert training.main(run_args(assets, output_dir, max_steps=100000, max_time_minutes=0.001)) == 0
    results = json.loads((output_dir / training.EVAL_RESULTS_NAME).read_text())
    assert results["stop_reason"] == "max_time" and results["step"] < 100000
    assert "test_exact_match" in results and (output_dir / "model.safetensors").is_file()
    assert ckpt.find_latest_checkpoint(output_dir) == output_dir / f"checkpoint-{results['step']}"


def test_average_checkpoints_at_the_end(assets, tmp_path):
    output_dir = tmp_path / "averaged"
    assert training.main(run_args(assets, output_dir, average_checkpoints=2, save_total_limit=2)) == 0
    results = json.loads((output_dir / training.EVAL_RESULTS_NAME).read_text())
    assert [Path(p).name for p in results["averaged_checkpoints"]] == ["checkpoint-8", "checkpoint-12"]
    a, b, final = weights(output_dir / "checkpoint-8"), weights(output_dir / "checkpoint-12"), weights(output_dir)
    for name in final:
        torch.testing.assert_close(final[name], (a[name].double() + b[name].double()).div(2).float(), rtol=0, atol=1e-7)
    # The standalone script gives the same average, as a model folder that loads and generates.
    averaged = tmp_path / "by_script"
    assert load_script("average_checkpoints").main(["--input_dir", str(output_dir), "--last", "2", "--output", str(averaged)]) == 0
    assert_same_weights(averaged, output_dir, atol=0)
    model, tokenizer = training.load_model_and_tokenizer(averaged, device="cpu")
    assert len(training.translate_texts(model, tokenizer, ["seven"], num_beams=1)) == 1


@pytest.mark.parametrize("tied_scores", [None, 0.0, 100.0])
def test_an_average_that_validates_worse_than_the_last_checkpoint_is_not_the_final_model(assets, tmp_path, monkeypatch,
                                                                                        caplog, tied_scores):
    """The paper averages a converged model's checkpoints; a short run's average (the warm-up's peak among them) can
    validate far worse than its last checkpoint (a review's English-Japanese run: BLEU 13.9 against 21.8), and it was
    saved, tested and published as the model. Worse in validation loss and in BLEU or chrF (better in neither), it is
    now left out: the final model is the last checkpoint, and eval_results.json names the average's checkpoints as
    rejected. With BLEU and chrF tied (`tied_scores`), the loss decides at 0 (nothing translated right yet), and the
    paper's average stays at 100."""
    average = ckpt.average_state_dicts
    if tied_scores is not None:
        scores = training.translation_metrics
        monkeypatch.setattr(training, "translation_metrics", lambda *args, **kwargs: {
            **scores(*args, **kwargs), "bleu": tied_scores, "chrf": tied_scores})

    def spoiled(*args, **kwargs):  # an average far from every checkpoint, as a run's early ones can make it
        generator = torch.Generator().manual_seed(0)
        return {name: value + torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
                for name, value in average(*args, **kwargs).items()}

    monkeypatch.setattr(ckpt, "average_state_dicts", spoiled)
    output_dir = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert training.main(run_args(assets, output_dir, average_checkpoints=2, save_total_limit=2)) == 0
    evaluations = {r.get("averaged", False): r for r in read_log(output_dir) if r["type"] == "eval" and r["step"] == 12}
    averaged, last = evaluations[True], evaluations[False]
    results = json.loads((output_dir / training.EVAL_RESULTS_NAME).read_text())
    assert averaged["val_loss"] > last["val_loss"]
    if tied_scores == 100:
        assert [Path(p).name for p in results["averaged_checkpoints"]] == ["checkpoint-8", "checkpoint-12"]
        assert "average_rejected" not in results and "validates worse" not in caplog.text
        return
    if tied_scores is None:
        assert averaged["val_chrf"] < last["val_chrf"]
        assert averaged["val_bleu"] == last["val_bleu"] == 0  # 12 steps: no 4-gram right yet; chrF and the loss tell
    assert (f"The average of the last 2 checkpoints validates worse than checkpoint-12 (val_loss {averaged['val_loss']:.4f} "
            f"against {last['val_loss']:.4f}, val_bleu 0.00 against 0.00, val_chrf {averaged['val_chrf']:.2f} against "
            f"{last['val_chrf']:.2f})") in caplog.text
    assert results["averaged_checkpoints"] == []
    assert [Path(p).name for p in results["average_rejected"]] == ["checkpoint-8", "checkpoint-12"]
    assert_same_weights(output_dir, output_dir / "checkpoint-12", atol=0)


def test_an_average_that_would_not_load_is_not_written(reference_run, tmp_path):
    """The average takes the last input's config, generation config and tokenizer: one that does not load (an
    invalid dropout, which the architecture check leaves aside; a damaged generation config), or tokenizers that
    differ between the inputs (one of them left without its tokenizer.json), used to give a folder no script loads."""
    import shutil

    from modeling_seq2seq.tokenization import load_tokenizer, save_tokenizer

    def inputs(name, edit):
        first, last = tmp_path / name / "checkpoint-8", tmp_path / name / "checkpoint-12"
        for step, folder in ((8, first), (12, last)):
            shutil.copytree(reference_run / f"checkpoint-{step}", folder)
            (folder / ckpt.MANIFEST_NAME).unlink()
        edit(last)
        return [first, last]

    def dropout(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "dropout": 2.0}))

    def other_tokenizer(folder):
        tokenizer = load_tokenizer(folder)
        tokenizer.add_tokens(["extra"])
        save_tokenizer(tokenizer, folder)

    for name, edit, message in [
        ("dropout", dropout, "The average would not load, so it was not written ({last}/config.json: "),
        ("generation", lambda folder: (folder / "generation_config.json").write_text("[]"),
         "The average would not load, so it was not written ({last}/generation_config.json: expected a JSON object"),
        ("tokenizer", other_tokenizer, "{last}/tokenizer.json differs from {first}/tokenizer.json: the checkpoints were "
                                       "not trained with the same tokenizer"),
        ("no_tokenizer", lambda folder: (folder / "tokenizer.json").unlink(), "{last}/tokenizer.json differs from"),
    ]:
        first, last = inputs(name, edit)
        with pytest.raises(ckpt.CheckpointError, match=re.escape(message.format(first=first, last=last))):
            ckpt.average_checkpoints([first, last], tmp_path / "averaged")
        assert not (tmp_path / "averaged").exists() and not list(tmp_path.glob(f"{ckpt.TMP_PREFIX}*"))


def test_bf16_mixed_precision_on_cpu(assets, tmp_path):
    output_dir = tmp_path / "bf16"
    assert training.main(run_args(assets, output_dir, max_steps=4, mixed_precision="bf16")) == 0
    losses = [r["loss"] for r in read_log(output_dir) if r["type"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert weights(output_dir)["model.shared.weight"].dtype == torch.float32, "weights stay fp32; compute is bf16"


def test_compiled_step_gives_the_eager_loss_and_gradients_without_compiling_again_for_new_shapes():
    """`compile: true` runs the step through `compiled_for_training`: one graph, the same loss and gradients as the
    eager model, and no new compilation when the shape changes (token batches change it at every step), also past
    the positional table's size and across `linear()`'s oneDNN work threshold (2^23 multiply-adds)."""
    from torch._dynamo.utils import counters

    from test_model import make_model, padded_batch

    model = make_model(dropout=0.0, vocab_size=4096).train()  # output layer: 2^17 weights, oneDNN from 64 rows
    compiled = training.compiled_for_training(model)
    counters.clear()
    for index, (rows, length) in enumerate(((4, 11), (6, 9), (8, 70))):  # 70: past max_position_embeddings
        source, mask = padded_batch(seed=rows, batch=rows, length=length)
        batch = dict(input_ids=source, attention_mask=mask, labels=source[:, : length - 1 - 2 * index].clone())
        results = []
        for step_model in (compiled, model):  # compiled first: the eager run fills no cache the compiled one reads
            model.zero_grad(set_to_none=True)
            with torch._dynamo.config.patch(error_on_recompile=index > 0):
                loss = training.compute_loss(step_model, batch)
            loss.backward()
            results.append((loss.detach(), [p.grad for p in model.parameters()]))
        (compiled_loss, compiled_grads), (eager_loss, eager_grads) = results
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
        for eager_grad, compiled_grad in zip(eager_grads, compiled_grads):
            torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)


@pytest.mark.slow
def test_compile_leaves_a_model_that_accelerate_compiles_alone(assets, tmp_path, monkeypatch, capsys):
    """`accelerate launch --dynamo_backend inductor` compiles the model itself: `compile` then wraps nothing more."""
    compiled = []
    monkeypatch.setattr(training, "compiled_for_training", lambda model: compiled.append(model) or model)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    assert training.main(run_args(assets, tmp_path / "run", max_steps=2, compile=True)) == 0
    assert compiled == [] and "Accelerate already compiles the model" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_training_in_two_processes_trains_like_the_eager_loop_and_saves_plain_weights(assets, tmp_path):
    """The option in the loop, under `accelerate launch` (DDP over gloo, the compiled wrapper around the DDP model):
    without dropout, 2 compiled processes of 2 micro-batches each (the first under DDP's no_sync) log the losses of
    1 eager process with 4 micro-batches, and end with its weights, saved under the model's own names (the
    compiled wrapper is never what gets saved)."""
    no_dropout = {"dropout": 0.0}
    cpu_only = {**SUBPROCESS_ENV, "CUDA_VISIBLE_DEVICES": ""}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert training.main(run_args(assets, eager, max_steps=4, gradient_accumulation_steps=4, model_overrides=no_dropout)) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(REPO / "scripts" / "train.py")]
    result = subprocess.run(launch + run_args(assets, compiled, max_steps=4, gradient_accumulation_steps=2,
                                              model_overrides=no_dropout, compile=True),
                            capture_output=True, text=True, timeout=600, env=cpu_only)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "runs under torch.compile" in result.stdout
    losses = [[r["loss"] for r in read_log(folder) if r["type"] == "train"] for folder in (eager, compiled)]
    assert len(losses[0]) == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    eager_weights, compiled_weights = weights(eager), weights(compiled)
    assert compiled_weights.keys() == eager_weights.keys()
    for name, expected in eager_weights.items():
        actual = compiled_weights[name]
        if name.endswith("kv_proj.bias"):  # also qkv_proj
            # A key bias adds the same score to every key of a query: softmax cancels it, its exact gradient is 0,
            # and Adam scales the rounding noise standing in for it to full-size steps. Compare the rest.
            keys = slice(0, len(expected) // 2) if name.endswith(".kv_proj.bias") else slice(len(expected) // 3, 2 * len(expected) // 3)
            actual, expected = actual.clone(), expected.clone()
            actual[keys] = expected[keys] = 0
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------------
# Two processes (DDP over gloo on the CPU)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(assets, tmp_path):
    """2 processes x 1 micro-batch == 1 process x 2 micro-batches: the same token-weighted update.

    Dropout is off (each process draws its own masks). Tolerance 1e-5: only the order of floating-point
    sums differs (the all-reduce adds the two gradients in another order than accumulation does).
    """
    no_dropout = {"dropout": 0.0}
    cpu_only = {**SUBPROCESS_ENV, "CUDA_VISIBLE_DEVICES": ""}  # both on the CPU, also on a machine with a GPU
    one = tmp_path / "one_process"
    done = run_subprocess(run_args(assets, one, max_steps=8, gradient_accumulation_steps=2, model_overrides=no_dropout),
                          env=cpu_only)
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two_processes"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(REPO / "scripts" / "train.py")]
    result = subprocess.run(launch + run_args(assets, two, max_steps=8, model_overrides=no_dropout),
                            capture_output=True, text=True, timeout=400, env=cpu_only)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert_same_weights(two, one, atol=1e-5)
    assert json.loads((two / "checkpoint-8" / ckpt.TRAINER_STATE_NAME).read_text())["world_size"] == 2
    assert (two / "checkpoint-8" / "rng_state_1.pt").is_file()
    # Resumed by one process (even with the same global batch): refused, naming why, and nothing written.
    before = sorted(p.name for p in two.iterdir())
    resumed = run_subprocess(run_args(assets, two, max_steps=10, gradient_accumulation_steps=2,
                                      model_overrides=no_dropout, resume_from_checkpoint="latest"), env=cpu_only)
    assert resumed.returncode != 0
    assert "was written by 2 processes; resuming with 1" in resumed.stderr and "same number of processes" in resumed.stderr
    assert sorted(p.name for p in two.iterdir()) == before


@pytest.mark.slow
def test_two_processes_killed_part_way_resume_to_the_same_weights(assets, tmp_path):
    """Both processes of an `accelerate launch` run, and the launcher, killed at once (a job scheduler's SIGKILL;
    the launcher's own workers sit in sessions of their own, so a kill of its process group would miss them) at a
    random moment after the first checkpoint, then resumed with --resume_from_checkpoint latest by 2 processes: the
    run ends with the weights of 1 process accumulating 2 micro-batches (as in the test above; dropout off), a log
    with each step once, and no leftover of the killed run. The moment is seeded; the seed is printed on failure."""
    import psutil

    no_dropout = {"dropout": 0.0}
    cpu_only = {**SUBPROCESS_ENV, "CUDA_VISIBLE_DEVICES": ""}
    one = tmp_path / "one_process"
    assert training.main(run_args(assets, one, max_steps=40, gradient_accumulation_steps=2, model_overrides=no_dropout)) == 0
    two = tmp_path / "two_processes"
    seed = int(os.environ.get("KILL_SEED", random.randrange(10**6)))
    delay = random.Random(seed).uniform(0.0, 1.2)  # steps 4 to 40 take ~0.8 s here, the final save and test ~0.6 s

    def launch(*extra):
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), str(REPO / "scripts" / "train.py"),
                *run_args(assets, two, max_steps=40, model_overrides=no_dropout), *extra]

    process = subprocess.Popen(launch(), env=cpu_only, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (two / "checkpoint-4").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed = False
    try:
        assert process.wait(timeout=delay) == 0, f"KILL_SEED={seed}: the run failed on its own"
    except subprocess.TimeoutExpired:
        killed = True
        launcher = psutil.Process(process.pid)
        everyone = [launcher, *launcher.children(recursive=True)]
        assert len(everyone) >= 3, everyone
        for member in everyone:
            member.kill()
        psutil.wait_procs(everyone, timeout=60)
    result = subprocess.run(launch("--resume_from_checkpoint", "latest"), capture_output=True, text=True, timeout=400,
                            env=cpu_only)
    assert result.returncode == 0, f"KILL_SEED={seed}: {result.stderr[-3000:]}"
    assert not killed or re.search(r"Resumed (from \S+checkpoint-\d+ at step|at step 40, past)", result.stdout + result.stderr), seed
    assert_same_weights(two, one, atol=1e-5)
    steps = [r["step"] for r in read_log(two) if r["type"] == "train"]
    assert steps == list(range(2, 41, 2)), (seed, steps)
    assert not [entry.name for entry in two.iterdir() if entry.name.startswith(".") and entry.name != ckpt.LOCK_NAME]


PAGE_FAULTS_OF_A_REALLOCATION = """
import resource, sys, torch
from modeling_seq2seq.training import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(40):  # a buffer allocated anew each step, as the logits' gradient is
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer, small = torch.empty(64 * 2**20 // 4).fill_(1.0), torch.empty(1000)
    del buffer
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[20:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_keep_freed_memory_reuses_big_buffers_without_page_faults():
    def steady_state_faults(mode):
        result = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_A_REALLOCATION, mode], capture_output=True,
                                text=True, check=True)
        applied, count = result.stdout.split()
        return applied == "True", int(count)

    default_applied, default_faults = steady_state_faults("default")
    kept_applied, kept_faults = steady_state_faults("keep")
    pages_per_step = 64 * 2**20 // 4096
    assert not default_applied and default_faults > 10 * pages_per_step  # a fresh mmap every step
    assert kept_applied and kept_faults < pages_per_step


def test_a_dataset_without_a_training_split_names_itself_and_its_splits(monkeypatch):
    import datasets
    from datasets import Dataset, DatasetDict

    raw = DatasetDict({"validation": Dataset.from_dict({"en": ["a"], "de": ["b"]})})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: raw)
    with pytest.raises(ValueError, match=re.escape("./only_validation has no 'train' split (its splits: validation).")):
        training.load_raw_data(training.TrainingConfig(dataset_name="./only_validation"))


# --------------------------------------------------------------------------------------------------------
# The loss the loop optimises and reports, against float64 recomputations


def _example(generator, source_length, target_length, vocab=64):
    """Random ids (no special tokens) ending with eos, as tokenize_pairs makes them."""
    source = torch.randint(4, vocab, (source_length,), generator=generator).tolist()[:-1] + [2]
    target = torch.randint(4, vocab, (target_length,), generator=generator).tolist()[:-1] + [2]
    return {"input_ids": source, "labels": target}


def test_an_accumulated_update_is_the_gradient_of_the_mean_loss_over_every_target_token():
    """Micro-batches of very different target-token counts: the update is that of one batch holding them all (the mean
    over every target token, Section 5.1's token batches), not the mean of per-micro-batch means, and the logged loss
    is that token mean too."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from modeling_seq2seq.data import Seq2SeqCollator
    from test_model import make_model

    generator = torch.Generator().manual_seed(0)
    micro = [[_example(generator, 5, 2)],
             [_example(generator, 7, 9), _example(generator, 4, 6), _example(generator, 6, 8)]]
    collator = Seq2SeqCollator(pad_token_id=0)
    model, reference = make_model(dropout=0.0).train(), make_model(dropout=0.0).train()  # the same weights
    whole = collator(micro[0] + micro[1])
    loss = reference(**whole).loss  # the mean over all 1 + 3 examples' target tokens
    loss.backward()

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        trainer = object.__new__(training.Trainer)
        trainer.accelerator = Accelerator(cpu=True)
        trainer.model = trainer.step_model = model
        trainer.world_size = 1
        trainer.config = TrainingConfig(gradient_accumulation_steps=2, max_grad_norm=None)
        trainer.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the gradient
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
        trainer.step = trainer.skipped_steps = trainer.consecutive_bad_steps = 0
        before = [p.detach().clone() for p in model.parameters()]
        result = trainer.train_step([collator(m) for m in micro])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert result["status"] == "ok" and result["target_tokens"] == 2 + 9 + 6 + 8
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for (name, p), start, r in zip(model.named_parameters(), before, reference.parameters()):
        torch.testing.assert_close(start - p.detach(), r.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_validation_loss_is_token_weighted_in_eval_mode_and_leaves_the_mode_as_it_was():
    """Several batches of different target-token counts, and dropout that would change every number in train mode:
    the loss and NLL are sums over every target token (float64, one example at a time, eval mode) over the count."""
    from datasets import Dataset

    from modeling_seq2seq.data import Seq2SeqCollator
    from test_model import make_model

    generator = torch.Generator().manual_seed(1)
    examples = [_example(generator, s, t) for s, t in ((3, 2), (9, 12), (4, 3), (12, 14), (5, 5), (2, 9))]
    dataset = Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]})
    collator = Seq2SeqCollator(pad_token_id=0)
    model = make_model(dropout=0.5, label_smoothing=0.1).train()
    results = [training.validation_loss(model, dataset, collator, max_tokens=16) for _ in range(2)]
    assert model.training
    model.eval()
    loss_sum = nll_sum = tokens = 0.0
    with torch.no_grad():
        for example in examples:
            batch = collator([example])
            logits = model(**batch).logits.double().flatten(0, 1)
            labels = batch["labels"].flatten()
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1, reduction="sum").item()
            nll_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            tokens += len(example["labels"])
    for result in results:
        assert result["loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)
        assert result["nll"] == pytest.approx(nll_sum / tokens, rel=1e-5)
        assert result["ppl"] == pytest.approx(math.exp(nll_sum / tokens), rel=1e-5)


def test_the_endless_stream_moves_to_the_next_epochs_order():
    """After the last batch of an epoch the loop goes on with the next epoch's batches (another shuffle), every example
    once per epoch."""
    from datasets import Dataset

    from modeling_seq2seq.data import Seq2SeqCollator, TokenBatchSampler, token_lengths

    generator = torch.Generator().manual_seed(2)
    examples = [_example(generator, 2 + i % 7, 2 + (3 * i) % 5) for i in range(40)]
    trainer = object.__new__(training.Trainer)
    trainer.train_set = Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples],
                                           "labels": [e["labels"] for e in examples]})
    trainer.collator = Seq2SeqCollator(pad_token_id=0)
    trainer.sampler = TokenBatchSampler(*token_lengths(trainer.train_set), max_tokens=24, shuffle=True, seed=5)
    expected = [trainer.sampler.global_batches(epoch) for epoch in range(3)]
    assert expected[0] != expected[1] != expected[2]
    stream = trainer.micro_batches()
    for epoch in range(3):
        for indices in expected[epoch]:
            batch = next(stream)
            assert torch.equal(batch["labels"], collate_rows(trainer, indices)["labels"])
        assert trainer.sampler.epoch == epoch
    next(stream)
    assert trainer.sampler.epoch == 3


def collate_rows(trainer, indices):
    return trainer.collator([{"input_ids": trainer.train_set[i]["input_ids"], "labels": trainer.train_set[i]["labels"]}
                             for i in indices])


def test_the_test_bleu_follows_the_target_language_and_effective_order_of_the_builtin_task(short_run, assets, tmp_path):
    """The built-in task's one-word German targets are scored with effective order (else perfect output scores 0); a
    Chinese target is scored with sacrebleu's zh tokenizer, as `sacrebleu -l en-zh` would, not 13a."""
    results = json.loads((short_run / training.EVAL_RESULTS_NAME).read_text())
    assert "|eff:yes|tok:13a|" in results["bleu_signature"], results["bleu_signature"]

    data = tmp_path / "data"
    write_builtin_task_as_line_files(data, "zh", train=100, test=4)
    output_dir = tmp_path / "zh"
    args = run_args(assets, output_dir, max_steps=1, save_steps=0, train_file=str(data / "train"),
                    test_file=str(data / "test"), source_lang="en", target_lang="zh")
    assert training.main(args) == 0
    signature = json.loads((output_dir / training.EVAL_RESULTS_NAME).read_text())["bleu_signature"]
    assert "|eff:no|tok:zh|" in signature, signature


class InfiniteGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: a finite loss whose update would not be."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("asked_by", ["flag", "accelerate launch config"])
def test_bf16_mixed_precision_runs_the_step_under_bf16_autocast_and_skips_an_infinite_gradient(assets, tmp_path,
                                                                                                 monkeypatch, asked_by):
    """`mixed_precision: bf16` reaches the step (the model's products, the logits among them, are bfloat16: CPU
    autocast as accelerate sets it up), and bf16 has no loss scaler: a finite loss with an infinite gradient is
    a bad step, skipped without touching the weights (only fp16's scaler skips such steps itself). Unset in the
    recipe, the precision is the one `accelerate launch --config_file` asks for (the recipe's default "no" overrode
    configs/accelerate/*.yaml's bf16)."""
    seen = []

    real = training.compute_loss
    hooked = set()

    def compute_loss(model, batch):  # the output projection's dtype: bf16 products (accelerate returns fp32 outputs)
        lm_head = getattr(model, "module", model).lm_head
        if id(lm_head) not in hooked:
            hooked.add(id(lm_head))
            lm_head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        loss = real(model, batch)
        return InfiniteGradient.apply(loss) if len(seen) == 2 else loss

    monkeypatch.setattr(training, "compute_loss", compute_loss)
    output_dir = tmp_path / "bf16"
    if asked_by == "flag":
        assert training.main(run_args(assets, output_dir, max_steps=3, mixed_precision="bf16")) == 0
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` passes from its config
        assert training.main(run_args(assets, output_dir, max_steps=3)) == 0
    assert seen and set(seen) == {torch.bfloat16}, seen
    assert json.loads((output_dir / training.EVAL_RESULTS_NAME).read_text())["training_config"]["mixed_precision"] == "bf16"
    skipped = [r for r in read_log(output_dir) if r["type"] == "skipped"]
    assert [(r["step"], r["consecutive"]) for r in skipped] == [(1, 1)]
    assert all(torch.isfinite(t).all() for t in weights(output_dir).values())


def test_what_accelerate_launch_asks_for_and_the_run_does_not_is_said(assets, tmp_path, monkeypatch, caplog):
    """The recipe's mixed_precision wins over the launcher's (configs/train-tiny.yaml says "no"), and FSDP on a CPU runs
    as plain data parallelism: both silently, before."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level("WARNING"):
        assert training.main(run_args(assets, tmp_path / "run", max_steps=1, mixed_precision="no")) == 0
    assert "accelerate launch asked for bf16 mixed precision; the recipe's mixed_precision 'no' wins" in caplog.text
    assert "The accelerate config asks for FSDP, which Accelerate sets up for several processes on accelerators" in caplog.text
    assert json.loads((tmp_path / "run" / training.EVAL_RESULTS_NAME).read_text())["training_config"][
        "mixed_precision"] == "no"


@pytest.mark.slow
def test_two_processes_log_the_global_token_mean_and_seed_each_process_differently(assets, tmp_path):
    """2 processes x 1 micro-batch log what 1 process x 2 micro-batches logs: the loss as the mean over every target
    token of the update (gathered from both processes), and the same gradient norm (the all-reduced gradient is the
    one of that mean, not of one process's half). Each process seeds its generators differently (dropout masks):
    their Python and numpy states in the checkpoint differ (no training step draws from them, so only the seed can)."""
    no_dropout = {"dropout": 0.0}
    cpu_only = {**SUBPROCESS_ENV, "CUDA_VISIBLE_DEVICES": ""}
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    done = run_subprocess(run_args(assets, one, max_steps=4, logging_steps=1, gradient_accumulation_steps=2,
                                   model_overrides=no_dropout), env=cpu_only)
    assert done.returncode == 0, done.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(REPO / "scripts" / "train.py")]
    result = subprocess.run(launch + run_args(assets, two, max_steps=4, logging_steps=1, save_steps=4,
                                              model_overrides=no_dropout),
                            capture_output=True, text=True, timeout=400, env=cpu_only)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [[(r["loss"], r["grad_norm"]) for r in read_log(folder) if r["type"] == "train"] for folder in (one, two)]
    assert len(logged[0]) == len(logged[1]) == 4
    for (loss_one, norm_one), (loss_two, norm_two) in zip(*logged):
        assert loss_two == pytest.approx(loss_one, rel=1e-5) and norm_two == pytest.approx(norm_one, rel=1e-4)
    states = [json.loads((two / "checkpoint-4" / f"rng_state_{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0]["python"] != states[1]["python"] and states[0]["numpy"] != states[1]["numpy"]


def test_only_the_main_process_writes_a_checkpoints_shared_files(tmp_path):
    """Every process writes its own random state into the staging folder; the shared files (weights, optimizer,
    trainer state) and the rename into place are the main process's alone. Two processes writing them would race
    (their bytes are equal, so the two-process runs above cannot tell)."""
    class Accelerator:  # one of several processes, without the collectives
        device = torch.device("cpu")

        def wait_for_everyone(self):
            pass

        def reduce(self, tensor, reduction):
            return tensor

    trainer = object.__new__(training.Trainer)
    trainer.accelerator, trainer.output_dir = Accelerator(), tmp_path
    for is_main, step in ((False, 3), (True, 4)):
        trainer.is_main, writes = is_main, []
        trainer._save_distributed(step, lambda staging: writes.append("shared"), lambda staging: writes.append("own"))
        assert writes == (["shared", "own"] if is_main else ["own"])
        assert ckpt.checkpoint_path(tmp_path, step).is_dir() is is_main


def write_builtin_task_as_line_files(folder: Path, target_lang: str, train: int, test: int) -> None:
    """The first rows of the built-in task's splits as Moses-style line files: FOLDER/{train,test}.{en,TARGET_LANG}."""
    from modeling_seq2seq.data import builtin_task

    folder.mkdir(parents=True)
    task = builtin_task()
    for split, count in (("train", train), ("test", test)):
        rows = task[split].select(range(count))
        (folder / f"{split}.en").write_text("".join(f"{s}\n" for s in rows["source"]))
        (folder / f"{split}.{target_lang}").write_text("".join(f"{t}\n" for t in rows["target"]))


def test_fp16_loss_scaler_survives_a_non_finite_loss(monkeypatch):
    """fp16 (a GPU's GradScaler; torch's CPU scaler stands in): `gradient_norm` unscales the gradients before the
    non-finite loss is seen; the skipped update must still end the scaler's step, or the next step's unscale raises
    "unscale_() has already been called on this optimizer since the last update()". As on an overflow, the scale
    grows again only after `growth_interval` good steps (it grew back at the next good step)."""
    import types

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from test_model import make_model, padded_batch

    real = training.compute_loss
    for max_grad_norm in (None, 1.0):
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=True)
        accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", growth_interval=2), True  # as on a GPU
        accelerator.state._mixed_precision = "fp16"  # not monkeypatch: its undo would write into the reset shared state
        config = training.TrainingConfig(mixed_precision="fp16", max_grad_norm=max_grad_norm)
        model = make_model(dropout=0.0).train()
        optimizer, scheduler = training.make_optimizer_and_scheduler(model, config, model.config.d_model)
        model, optimizer = accelerator.prepare(model, optimizer)
        trainer = types.SimpleNamespace(accelerator=accelerator, model=model, step_model=model, world_size=1,
                                        config=config, optimizer=optimizer, scheduler=scheduler, skipped_steps=0,
                                        consecutive_bad_steps=0, step=0)
        source, mask = padded_batch()
        batch = dict(input_ids=source, attention_mask=mask, labels=source[:, :5])
        calls = []

        def nan_first(model, batch):
            calls.append(1)
            loss = real(model, batch)
            return loss * float("nan") if len(calls) == 2 else loss

        monkeypatch.setattr(training, "compute_loss", nan_first)
        scale = accelerator.scaler.get_scale()
        assert training.Trainer.train_step(trainer, [batch])["status"] == "ok"
        assert training.Trainer.train_step(trainer, [batch])["status"] == "bad"
        assert accelerator.scaler.get_scale() == scale / 2  # backed off, as on an overflow
        assert training.Trainer.train_step(trainer, [batch])["status"] == "ok"
        assert accelerator.scaler.get_scale() == scale / 2  # one good step since: not grown yet
        assert training.Trainer.train_step(trainer, [batch])["status"] == "ok"
        assert accelerator.scaler.get_scale() == scale
        assert trainer.step == 3
    AcceleratorState._reset_state(reset_partial_state=True)


def test_fp16_without_a_loss_scaler_still_skips_an_infinite_gradient(assets, tmp_path, monkeypatch):
    """`mixed_precision: fp16` where Accelerate makes no loss scaler (a CPU): nothing else skips a step with an
    infinite gradient, so the loop must (before, the update was applied and the weights became NaN)."""
    real, calls = training.compute_loss, []

    def compute_loss(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return InfiniteGradient.apply(loss) if len(calls) == 2 else loss

    monkeypatch.setattr(training, "compute_loss", compute_loss)
    output_dir = tmp_path / "fp16"
    assert training.main(run_args(assets, output_dir, max_steps=3, mixed_precision="fp16")) == 0
    assert [(r["step"], r["consecutive"]) for r in read_log(output_dir) if r["type"] == "skipped"] == [(1, 1)]
    assert all(torch.isfinite(t).all() for t in weights(output_dir).values())
