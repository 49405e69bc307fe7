"""A saved model fine-tunes with the stock transformers Seq2SeqTrainer (scripts/finetune_trainer.py)."""

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def number_pairs(tmp_path):
    """Train/validation files of the built-in task's kind (a few hundred pairs, so no full task generation)."""
    from num2words import num2words

    def write(name, numbers):
        path = tmp_path / name
        path.write_text("".join(
            json.dumps({"translation": {"en": num2words(n, lang="en"), "de": num2words(n, lang="de")}}) + "\n" for n in numbers
        ))
        return path

    return write("train.jsonl", range(0, 1000, 2)), write("validation.jsonl", range(1, 64, 4))


@pytest.fixture
def saved_model(tmp_path, number_pairs):
    """A freshly initialised tiny model and a BPE tokenizer, saved as scripts/train.py saves them."""
    from modeling_seq2seq import Seq2SeqTransformerConfig, Seq2SeqTransformerForConditionalGeneration
    from modeling_seq2seq.data import read_parallel_file
    from modeling_seq2seq.tokenization import save_tokenizer, train_tokenizer

    train = read_parallel_file(number_pairs[0])
    tokenizer = train_tokenizer(list(train["source"]) + list(train["target"]), vocab_size=300)
    torch.manual_seed(0)
    config = Seq2SeqTransformerConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        label_smoothing=0.1,
    )
    model = Seq2SeqTransformerForConditionalGeneration(config)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


def test_seq2seq_trainer_lowers_the_loss_and_generation_works(saved_model, number_pairs, tmp_path):
    script = load_script("finetune_trainer")
    output_dir = tmp_path / "finetuned"
    args = script.build_parser().parse_args([
        "--model", str(saved_model), "--output_dir", str(output_dir), "--train_file", str(number_pairs[0]),
        "--validation_file", str(number_pairs[1]), "--max_source_length", "14",
        "--max_eval_samples", "16", "--max_steps", "40", "--learning_rate", "3e-3", "--warmup_steps", "5",
        "--batch_size", "32", "--eval_steps", "40", "--logging_steps", "10", "--num_beams", "2", "--use_cpu", "--quiet",
    ])
    trainer, metrics = script.finetune(args)

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses
    # predict_with_generate evaluated with beam search and our metric module.
    assert {"eval_loss", "eval_bleu", "eval_chrf", "eval_exact_match"} <= metrics.keys()

    from modeling_seq2seq.training import load_model_and_tokenizer, translate_texts

    model, tokenizer = load_model_and_tokenizer(output_dir, device="cpu")
    assert model.config.use_cache is True, "the saved config keeps the cache on"
    assert json.loads((output_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    translations = translate_texts(model, tokenizer, ["twenty-one", "three hundred and five"], num_beams=2)
    assert len(translations) == 2 and all(isinstance(t, str) for t in translations)
    before = load_script("finetune_trainer")  # the script is importable twice (no global state)
    assert before.build_parser().parse_args(["--model", "m", "--output_dir", "o"]).max_steps == 500
    for bad in (["--save_steps", "-1"], ["--max_steps", "0"], ["--max_train_samples", "-5"], ["--num_beams", "0"],
                ["--max_source_length", "1"], ["--validation_file", "v.jsonl"], ["--learning_rate", "inf"],
                ["--learning_rate", "nan"]):
        with pytest.raises(SystemExit):
            before.main(["--model", "m", "--output_dir", "o", *bad])
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(SystemExit):
        before.main(["--model", "m", "--output_dir", str(tmp_path / "a_file")])
    assert (tmp_path / "a_file").read_text() == "mine"


def test_pairs_over_the_length_limits_are_left_out_not_cut(saved_model, number_pairs, tmp_path, capsys):
    """A target cut at the limit still ends in </s>: the model would learn to stop mid-sentence. As scripts/train.py,
    such pairs are left out of training; validation references stay whole (the scores are computed on them)."""
    from modeling_seq2seq.tokenization import load_tokenizer

    script = load_script("finetune_trainer")
    tokenizer = load_tokenizer(saved_model)
    args = script.build_parser().parse_args([
        "--model", str(saved_model), "--output_dir", str(tmp_path / "o"), "--train_file", str(number_pairs[0]),
        "--validation_file", str(number_pairs[1]), "--max_source_length", "12", "--max_target_length", "8"])
    train, validation = script.build_datasets(tokenizer, args, max_position_embeddings=64)
    full = tokenizer([json.loads(line)["translation"]["de"] for line in number_pairs[0].read_text().splitlines()])
    short = sum(len(ids) <= 8 for ids in full["input_ids"])
    assert 0 < len(train) <= short < 500 and max(len(labels) for labels in train["labels"]) <= 8
    assert all(labels[-1] == tokenizer.eos_token_id for labels in train["labels"])
    assert f"Left out {500 - len(train)} training pairs longer than 12/8 tokens" in capsys.readouterr().err
    references = [json.loads(line)["translation"]["de"] for line in number_pairs[1].read_text().splitlines()]
    assert [tokenizer.decode(labels, skip_special_tokens=True) for labels in validation["labels"]] == references


def test_a_datasets_dataset_feeds_the_trainer(saved_model, number_pairs, tmp_path, monkeypatch, capsys):
    """--dataset_name, as train.py and transformers' run_translation.py have it (a Hub name, a data folder, a
    DatasetDict saved with save_to_disk): the script took local files alone."""
    import shutil

    from modeling_seq2seq.tokenization import load_tokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(number_pairs[0], folder / "train.jsonl")
    shutil.copy(number_pairs[1], folder / "validation.jsonl")
    script = load_script("finetune_trainer")
    common = ["--model", str(saved_model), "--output_dir", str(tmp_path / "o")]
    args = script.build_parser().parse_args([*common, "--dataset_name", str(folder)])
    train, validation = script.build_datasets(load_tokenizer(saved_model), args, max_position_embeddings=64)
    assert (len(train), len(validation)) == (500, 16)
    for extra, message in ((["--dataset_name", str(folder), "--train_file", str(number_pairs[0])], "not both"),
                           (["--dataset_config_name", "de-en"], "--dataset_config_name needs --dataset_name")):
        with pytest.raises(SystemExit):
            script.main([*common, *extra])
        assert message in capsys.readouterr().err


def test_trainer_checkpoints_resume_to_the_same_weights(saved_model, number_pairs, tmp_path, caplog, capsys):
    """--save_steps writes the Trainer's checkpoints; --resume_from_checkpoint continues one to the weights of the
    run that was never stopped; `latest` skips a torn checkpoint."""
    from safetensors.torch import load_file

    from modeling_seq2seq import checkpointing as ckpt

    script = load_script("finetune_trainer")

    def run(output_dir, *extra):
        args = script.build_parser().parse_args([
            "--model", str(saved_model), "--output_dir", str(output_dir), "--train_file", str(number_pairs[0]),
            "--max_source_length", "14", "--max_steps", "12", "--learning_rate", "3e-3", "--warmup_steps", "5",
            "--batch_size", "32", "--logging_steps", "6", "--num_beams", "1", "--use_cpu", "--quiet", *extra,
        ])
        script.finetune(args)
        return load_file(str(output_dir / "model.safetensors"))

    whole = run(tmp_path / "whole", "--save_steps", "6")
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    for checkpoint in (tmp_path / "whole").glob("checkpoint-*"):  # each one complete, by our manifest
        assert ckpt.verify_checkpoint(checkpoint) is None
    resumed = run(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-6"))
    shutil.copytree(tmp_path / "whole" / "checkpoint-6", tmp_path / "again" / "checkpoint-6")
    # A later checkpoint torn by a kill: its weights cut short, and no manifest (the Trainer had not finished).
    shutil.copytree(tmp_path / "whole" / "checkpoint-12", tmp_path / "again" / "checkpoint-9")
    torn = tmp_path / "again" / "checkpoint-9"
    (torn / ckpt.MANIFEST_NAME).unlink()
    (torn / "model.safetensors").write_bytes((torn / "model.safetensors").read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        latest = run(tmp_path / "again", "--resume_from_checkpoint", "latest")
    assert "Skipping incomplete checkpoint" in caplog.text and "checkpoint-9" in caplog.text
    for other in (resumed, latest):
        assert whole.keys() == other.keys()
        for name in whole:
            torch.testing.assert_close(other[name], whole[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")

    # Resuming a finished run trains nothing and keeps its model (the stock Trainer would take one more step); the
    # staging folder of a final save that was killed is removed.
    final = (tmp_path / "whole" / "model.safetensors").read_bytes()
    (tmp_path / "whole" / f"{script.FINAL_STAGING_PREFIX}abc_1234" / "sub").mkdir(parents=True)
    (tmp_path / "whole" / f"{script.FINAL_STAGING_PREFIX}notes").mkdir()  # a user's look-alike stays
    run(tmp_path / "whole", "--resume_from_checkpoint", "latest")
    assert [p.name for p in (tmp_path / "whole").glob(f"{script.FINAL_STAGING_PREFIX}*")] == [
        f"{script.FINAL_STAGING_PREFIX}notes"]
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == final
    assert not (tmp_path / "whole" / "checkpoint-13").exists()
    # A final save killed before its step was recorded (here: the earlier final model left, no record) is done again
    # from the last checkpoint, training nothing (the stock Trainer trained a step past --max_steps at each resume).
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.copy(tmp_path / "whole" / "checkpoint-6" / "model.safetensors", tmp_path / "cut" / "model.safetensors")
    (tmp_path / "cut" / script.FINAL_STATE_NAME).unlink()
    run(tmp_path / "cut", "--resume_from_checkpoint", "latest")
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == final
    assert json.loads((tmp_path / "cut" / script.FINAL_STATE_NAME).read_text()) == {"global_step": 12}
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    # --overwrite_output_dir: the earlier run's checkpoints go, or `latest` would later take one as this run's.
    run(tmp_path / "cut", "--overwrite_output_dir", "--max_steps", "4", "--save_steps", "4")
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-4"]
    assert json.loads((tmp_path / "cut" / script.FINAL_STATE_NAME).read_text()) == {"global_step": 4}
    # A new run never writes over the model it starts from, nor over a folder's contents unless told to.
    with pytest.raises(ValueError, match="is the --model folder"):
        run(saved_model)
    with pytest.raises(ValueError, match="is not empty"):
        run(tmp_path / "whole")
    # Nor from one of its own checkpoints, which its checkpoints would overwrite (or rotate away), even when told to.
    inside = script.build_parser().parse_args(["--model", str(tmp_path / "whole" / "checkpoint-6"), "--output_dir",
                                               str(tmp_path / "whole"), "--overwrite_output_dir"])
    with pytest.raises(ValueError, match="is a checkpoint folder inside --output_dir"):
        script.check_output_dir(inside, None)
    # Nor over a data file it reads, named like a file the save writes (config.json, overwritten by the model's).
    data_there = script.build_parser().parse_args(["--model", str(saved_model), "--output_dir", str(tmp_path / "od"),
                                                   "--train_file", str(tmp_path / "od" / "config.json"),
                                                   "--overwrite_output_dir"])
    with pytest.raises(ValueError, match="--train_file .*config.json' lies in --output_dir under a name the fine-tuned"):
        script.check_output_dir(data_there, None)
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == final
    # The two loops' checkpoints share our manifest, not their state: each names the other's (once a raw KeyError or
    # TypeError from deep inside).
    from modeling_seq2seq import training

    with pytest.raises(ckpt.CheckpointError, match="Seq2SeqTrainer checkpoint: resume it with scripts/finetune_trainer"):
        training.check_own_checkpoint(tmp_path / "whole" / "checkpoint-12")
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / ckpt.TRAINER_STATE_NAME).write_text(json.dumps({"step": 12, "sampler": {}}))
    with pytest.raises(ValueError, match="has no whole-number 'global_step': not a Seq2SeqTrainer checkpoint"):
        script.checkpoint_step(ours)
    # A checkpoint given by its path is verified as `latest` verifies one: a damaged file is named before the Trainer
    # unpickles it; a saved model is no checkpoint.
    damaged = tmp_path / "damaged" / "checkpoint-6"
    shutil.copytree(tmp_path / "whole" / "checkpoint-6", damaged)
    (damaged / "optimizer.pt").write_bytes(b"x" * 500)
    # Killed after the Trainer wrote the model (and training_args.bin) into checkpoint-N, before its optimizer: torn,
    # not "a saved model" to fine-tune (as it was called).
    torn = tmp_path / "torn" / "checkpoint-6"
    shutil.copytree(tmp_path / "whole" / "checkpoint-6", torn)
    for path in torn.iterdir():
        if ckpt.is_training_state(path.name) or path.name == ckpt.MANIFEST_NAME:
            path.unlink()
    assert (torn / "training_args.bin").is_file() and (torn / "config.json").is_file()
    for folder, reason in [(damaged, "optimizer.pt has 500 bytes, the manifest says"),
                           (torn, "no manifest.json (the write did not finish)"),
                           (saved_model, "a saved model, not a training checkpoint")]:
        assert script.main(["--model", str(saved_model), "--output_dir", str(tmp_path / "from-damaged"), "--train_file",
                            str(number_pairs[0]), "--use_cpu", "--quiet", "--resume_from_checkpoint", str(folder)]) == 1
        error = capsys.readouterr().err
        assert f"Cannot resume from {str(folder)!r}: {reason}" in error and "Traceback" not in error, error


def test_the_final_model_is_replaced_file_by_file_and_a_failed_save_leaves_the_old_one(tmp_path):
    """`save_final_model` stages the Trainer's files and the tokenizer, then renames them in, configs last; a save that
    fails halfway (here: after the weights were written) leaves the earlier final model as it was, and no staging."""
    script = load_script("finetune_trainer")
    output_dir = tmp_path / "finetuned"
    output_dir.mkdir()
    (output_dir / "model.safetensors").write_bytes(b"earlier weights")
    (output_dir / "config.json").write_text("{}")

    class Trainer:
        def __init__(self, fail):
            self.fail = fail

        def is_world_process_zero(self):
            return True

        def save_model(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"new weights")
            if self.fail:
                raise OSError(28, "No space left on device")
            (Path(folder) / "config.json").write_text('{"new": true}')

    class Tokenizer:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")
            (Path(folder) / "tokenizer_config.json").write_text('{"tokenizer_class": "TokenizersBackend"}')

    with pytest.raises(OSError, match="No space left"):
        script.save_final_model(Trainer(fail=True).save_model, True, 12, Tokenizer(), str(output_dir))
    assert sorted(p.name for p in output_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert (output_dir / "model.safetensors").read_bytes() == b"earlier weights"
    moved = []
    real_replace = os.replace
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", lambda a, b: moved.append(Path(b).name) or real_replace(a, b))
        script.save_final_model(Trainer(fail=False).save_model, True, 12, Tokenizer(), str(output_dir))
    assert (output_dir / "model.safetensors").read_bytes() == b"new weights"
    assert json.loads((output_dir / "config.json").read_text()) == {"new": True}
    assert json.loads((output_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    final_moves = [name for name in moved if name in {"model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                                       "config.json", script.FINAL_STATE_NAME}]
    assert final_moves[-3:] == ["tokenizer_config.json", "config.json", script.FINAL_STATE_NAME]
    assert "model.safetensors" in final_moves[:-3]
    assert json.loads((output_dir / script.FINAL_STATE_NAME).read_text()) == {"global_step": 12}
    assert not [p for p in output_dir.iterdir() if p.name.startswith(".")]


def test_a_fine_tuning_stopped_by_sigterm_ends_with_one_line_and_leaves_no_staging(saved_model, number_pairs, tmp_path,
                                                                                  capsys, monkeypatch):
    """SIGTERM (here raised where the handler raises it: while the final model is moved in) ends the script with its
    exit code and a line saying how to continue, after its clean-up ran (it used to end where it stood)."""
    from modeling_seq2seq import checkpointing
    from modeling_seq2seq.training import Terminated

    def terminated(*args, **kwargs):
        raise Terminated()

    monkeypatch.setattr(checkpointing, "move_files_into", terminated)
    output_dir = tmp_path / "stopped"
    script = load_script("finetune_trainer")
    assert script.main(["--model", str(saved_model), "--output_dir", str(output_dir), "--train_file",
                        str(number_pairs[0]), "--max_steps", "2", "--save_steps", "0", "--use_cpu", "--quiet"]) == 143
    assert "Terminated: --resume_from_checkpoint latest continues from the last complete checkpoint" in \
        capsys.readouterr().err
    assert not [p for p in output_dir.iterdir() if p.name.startswith(script.FINAL_STAGING_PREFIX)]


def test_trainer_predictions_leave_the_cache_out(tmp_path):
    """`Trainer.prediction_step` returns the outputs not named in `config.keys_to_ignore_at_inference` as the
    predictions; the cache a forward without labels returns is not one of them (5.x names its field `cache`)."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from modeling_seq2seq.convert import to_marian
    from test_model import make_model, padded_batch

    model = make_model().eval()
    source, mask = padded_batch()
    inputs = dict(input_ids=source, attention_mask=mask, decoder_input_ids=source[:, :5], use_cache=True)
    assert "cache" in model(**inputs) or "past_key_values" in model(**inputs), "the forward returns a cache"
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    predictions = {}
    for name, candidate in (("ours", model), ("marian", to_marian(model).eval())):
        loss, predictions[name], labels = Seq2SeqTrainer(model=candidate, args=args).prediction_step(
            candidate, inputs, prediction_loss_only=False)
        assert loss is None and labels is None
    assert all(isinstance(tensor, torch.Tensor) for tensor in predictions["ours"]), "no Cache among the predictions"
    assert [t.shape for t in predictions["ours"]] == [t.shape for t in predictions["marian"]]  # logits, encoder states


def test_the_trainer_gets_the_papers_adam_schedule_and_label_smoothed_loss(saved_model, number_pairs, tmp_path):
    """What finetune hands the stock Trainer: Adam(0.9, 0.98, 1e-9) (Section 5.3), transformers' inverse-square-root
    schedule (linear warm-up, then lr * sqrt(warmup / step)), and a loss with the model's label smoothing over the
    labelled tokens only (the collator pads labels with -100). References: the closed-form schedule and
    F.cross_entropy(..., label_smoothing=, ignore_index=-100)."""
    import math

    script = load_script("finetune_trainer")
    args = script.build_parser().parse_args([
        "--model", str(saved_model), "--output_dir", str(tmp_path / "o"), "--train_file", str(number_pairs[0]),
        "--max_steps", "8", "--learning_rate", "1e-3", "--warmup_steps", "4", "--batch_size", "4",
        "--logging_steps", "1", "--use_cpu", "--quiet"])
    trainer, _ = script.finetune(args)
    group = trainer.optimizer.param_groups[0]
    assert tuple(group["betas"]) == (0.9, 0.98) and group["eps"] == 1e-9 and group["weight_decay"] == 0.0
    logged = [(entry["step"], entry["learning_rate"]) for entry in trainer.state.log_history if "learning_rate" in entry]
    assert [step for step, _ in logged] == list(range(1, 9))
    for step, lr in logged:  # the rate of update `step` is the schedule at step - 1
        expected = 1e-3 * ((step - 1) / 4 if step - 1 < 4 else math.sqrt(4 / (step - 1)))
        assert lr == pytest.approx(expected, rel=1e-6), (step, lr)

    model = trainer.model.eval()
    assert model.config.label_smoothing == 0.1
    examples = [trainer.train_dataset[i] for i in range(6)]
    assert len({len(e["labels"]) for e in examples}) > 1, "labels of different lengths: the batch has padding"
    batch = trainer.data_collator(examples)
    width = batch["labels"].shape[1]
    expected_labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples])
    assert torch.equal(batch["labels"], expected_labels)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), expected_labels.flatten(),
                                                  ignore_index=-100, label_smoothing=0.1)
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)


def test_compute_metrics_scores_aligned_decoded_pairs_as_sacrebleu_does(saved_model, number_pairs, tmp_path):
    """The Trainer hands compute_metrics generated ids padded with -100 across eval batches and labels with -100:
    both decode without them, prediction i is scored against reference i, and BLEU/chrF are sacrebleu's own (BLEU
    without effective order for a --train_file run, hypotheses first)."""
    import numpy as np
    import sacrebleu
    from transformers import EvalPrediction

    script = load_script("finetune_trainer")
    args = script.build_parser().parse_args([
        "--model", str(saved_model), "--output_dir", str(tmp_path / "o"), "--train_file", str(number_pairs[0]),
        "--validation_file", str(number_pairs[1]), "--max_eval_samples", "2", "--max_steps", "1",
        "--eval_steps", "100", "--batch_size", "4", "--num_beams", "2", "--use_cpu", "--quiet"])
    trainer, _ = script.finetune(args)
    assert trainer.args.generation_num_beams == 2
    tokenizer = trainer.processing_class
    predictions = ["achtundzwanzig und vierzig", "zweihundert", "neun und neunzig"]  # no 4-grams at all
    references = ["achtundzwanzig und vierzig drei", "zweihundert vier", "neun und neunzig"]

    def padded(texts, pad):
        rows = [tokenizer(text_target=t)["input_ids"] for t in texts]
        width = max(map(len, rows)) + 2
        return np.array([row + [pad] * (width - len(row)) for row in rows])

    start = np.full((3, 1), tokenizer.pad_token_id)  # generate's outputs begin with the start token
    got = trainer.compute_metrics(EvalPrediction(predictions=np.concatenate([start, padded(predictions, -100)], 1),
                                                 label_ids=padded(references, -100)))
    bleu = sacrebleu.metrics.BLEU(tokenize="13a").corpus_score(predictions, [references]).score
    chrf = sacrebleu.metrics.CHRF().corpus_score(predictions, [references]).score
    assert got == {"bleu": pytest.approx(bleu), "chrf": pytest.approx(chrf), "exact_match": pytest.approx(1 / 3)}
    # the check can fail: effective order, or hypotheses and references swapped, score otherwise
    assert bleu == 0.0 != sacrebleu.metrics.BLEU(tokenize="13a", effective_order=True).corpus_score(
        predictions, [references]).score
    assert sacrebleu.metrics.CHRF().corpus_score(references, [predictions]).score != pytest.approx(chrf)
    same = trainer.compute_metrics(EvalPrediction(predictions=padded(references, -100), label_ids=padded(references, -100)))
    assert same["exact_match"] == 1.0 and same["bleu"] == pytest.approx(100.0)
