"""The benchmark of issue 6: it runs end to end, writes the documented JSON, and its token check catches mismatches.

Speed is measured by the benchmark, never asserted here.
"""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modeling_seq2seq import benchmark, training
from modeling_seq2seq.benchmark import BenchmarkSettings, compare_tokens, format_table, run_benchmark, training_flops

REPO = Path(__file__).resolve().parents[1]
RECORD_FIELDS = {"implementation", "preset", "phase", "batch", "median_seconds", "tokens_per_second"}


@pytest.mark.slow
def test_quick_run_end_to_end_writes_the_documented_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    machine = result["machine"]
    assert machine["cpu_model"] and machine["threads"] == 2 and machine["torch_version"] == torch.__version__
    records = result["records"]
    assert all(RECORD_FIELDS <= set(r) for r in records)
    phases = {r["phase"] for r in records}
    assert phases == {"matmul_peak", "forward", "train", "train_memory", "train_length_mix", "decode_greedy",
                      "decode_beam4", "decode_sample", "translate_file"}
    assert {r["preset"] for r in records if r["preset"]} == {"tiny"}
    with_ct2 = result["settings"]["ctranslate2"]
    for phase in ("decode_greedy", "decode_beam4", "decode_sample"):
        for batch in (1, 8):
            found = {r["implementation"]: r for r in records if r["phase"] == phase and r["batch"] == batch}
            assert set(found) == ({"ours", "marian", "ctranslate2"} if with_ct2 else {"ours", "marian"})
            for r in found.values():
                assert r["median_seconds"] > 0 and r["tokens_per_second"] > 0 and r["tokens"] == batch * 32
                if r["implementation"] == "ctranslate2" and phase == "decode_sample":
                    assert r["token_check"] is None  # its own random generator: nothing to compare
                else:
                    assert "match" in r["token_check"]
            assert found["ours"]["token_check"]["match"]  # sampling too: the same draws as Marian's
            assert 0 < found["ours"]["decoder_products_seconds"]
    forward = {r["implementation"]: r for r in records if r["phase"] == "forward"}
    assert set(forward) == {"ours", "marian"} and all(0 <= r["logits_max_abs_diff"] <= 1e-3 for r in forward.values())
    assert all(r["tokens"] == 16 * (32 + 32) for r in forward.values())
    train = {r["implementation"]: r for r in records if r["phase"] == "train"}
    assert set(train) == {"ours", "marian"} and all(0 < r["mfu"] for r in train.values())
    assert {r["implementation"] for r in records if r["phase"] == "train_length_mix"} == {
        "ours+token_batches", "ours+padded", "marian+padded"}
    memory = [r for r in records if r["phase"] == "train_memory"]
    assert {r["implementation"] for r in memory} == {"ours", "marian"} and all(r["step_memory_mb"] > 0 for r in memory)
    translated = {r["implementation"]: r for r in records if r["phase"] == "translate_file"}
    assert set(translated) == ({"ours", "marian", "ctranslate2"} if with_ct2 else {"ours", "marian"})
    for r in translated.values():  # with the length pinned, each implementation's text is Marian's
        assert r["output_check"]["match"] and r["output_check"]["same_sentences"] == r["output_check"]["sentences"] > 0
    table = done.stdout
    assert "ours/Marian" in table and "ours/CT2" in table and "decode beam4" in table and "Machine:" in table
    assert "forward, no grad (float32)" in table
    assert table.count("the step's float32 matrix products alone") == 6
    assert "decode sample" in table and ("CT2 draws with its own random generator" in table) is with_ct2


def test_the_forward_phase_fails_where_our_logits_are_not_marians(monkeypatch):
    """The evaluation forward is timed only after the two models' logits are compared: ours with one weight off
    is a failure, and the table shows the difference."""
    real = benchmark.build_pair

    def skewed(*args, **kwargs):
        ours, marian = real(*args, **kwargs)
        with torch.no_grad():
            ours.model.decoder.layers[-1].final_layer_norm.bias.add_(0.5)
        return ours, marian

    settings = BenchmarkSettings(presets=("tiny",), phases=("forward",), repeats=1, progress=False,
                                 use_ctranslate2=False)
    assert run_benchmark(settings)["failures"] == []
    monkeypatch.setattr(benchmark, "build_pair", skewed)
    result = run_benchmark(settings)
    forward = [r for r in result["records"] if r["phase"] == "forward"]
    assert len(forward) == 2 and forward[0]["logits_max_abs_diff"] > 1e-3
    assert len(result["failures"]) == 1 and result["failures"][0].startswith("tiny forward: ours' logits differ")
    assert "logits max |ours - Marian|" in format_table(result)


def test_token_check_reports_a_mismatch(monkeypatch):
    """Make our generate return other tokens: the pre-timing check must say so, in the JSON, in the table and as a
    failure (until the eleventh session it was no failure: the exit status was 0)."""
    real = benchmark.decode_ours

    def wrong(model, input_ids, attention_mask, num_beams, sample=False):
        rows = real(model, input_ids, attention_mask, num_beams, sample)
        rows[0][3] = (rows[0][3] + 1) % model.config.vocab_size or 4
        return rows

    monkeypatch.setattr(benchmark, "decode_ours", wrong)
    settings = BenchmarkSettings(presets=("tiny",), phases=("decode",), repeats=1, progress=False)
    monkeypatch.setattr(BenchmarkSettings, "decode_batches", lambda self: [2])
    result = run_benchmark(settings)
    decoded = [r for r in result["records"] if r["phase"].startswith("decode")]
    ours = [r for r in decoded if r["implementation"] == "ours"]
    assert len(ours) == 3
    for r in ours:
        assert r["token_check"]["match"] is False
        assert r["token_check"]["mismatched_sequences"] == 1 and r["token_check"]["mismatched_tokens"] == 1
    for r in decoded:
        if r["implementation"] == "ctranslate2" and r["phase"] != "decode_sample":  # the converted model agrees
            assert r["token_check"]["match"] is True
    assert "MISMATCH ours vs Marian: 1/2 seqs" in format_table(result)
    # ... and as a failure, so that a script reading the JSON or the exit status sees it too.
    assert result["failures"] == [f"tiny {phase} batch 2: ours's tokens differ from Marian's in 1/64; its speed is not "
                                  "comparable" for phase in ("decode_greedy", "decode_beam4", "decode_sample")]


def test_a_failing_measurement_is_reported_and_the_others_still_run(monkeypatch, capsys):
    """One broken path (say a GPU kernel) costs its own rows only: the error is in the JSON, the table and the exit
    status, and the other phases are measured."""
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(benchmark, "run_decode", broken)
    monkeypatch.setattr(BenchmarkSettings, "decode_batches", lambda self: [1])
    monkeypatch.setattr(BenchmarkSettings, "train_shapes", lambda self: [(2, 6, 6)])
    settings = BenchmarkSettings(presets=("tiny",), phases=("decode", "train"), repeats=1, progress=False,
                                 use_ctranslate2=False)
    result = run_benchmark(settings)
    assert result["failures"] == ["tiny decode failed: RuntimeError: no kernel image is available"]
    assert {r["phase"] for r in result["records"]} == {"matmul_peak", "train"}
    assert "FAILED: tiny decode failed: RuntimeError" in format_table(result)
    assert "Traceback" in capsys.readouterr().err

    script = load_script()
    monkeypatch.setattr(script, "run_benchmark", lambda settings, **kwargs: result)
    assert script.main(["--quick"]) == 1


def load_script():
    from importlib import util

    spec = util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    script = util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("cpus, load, busy", [(2, 1.9, False), (2, 2.5, True), (16, 3.8, False), (16, 14.5, True)])
def test_the_busy_warning_counts_the_idle_cpus(cpus, load, busy):
    """The warning says the run's threads had to share CPUs: on 2 CPUs a load above 2, on a 16-CPU GPU host (where
    the GPU tests had just left a load of 3.8, and 12 CPUs were idle) a load above 14."""
    machine = dict(cpu_model="x", cpu_count=cpus, threads=2, device="cpu", torch_version="2", transformers_version="5",
                   ctranslate2_version=None, load_average_start=[load, load, load])
    table = format_table({"machine": machine, "records": [], "notes": [], "failures": []})
    assert ("Warning: the machine was busy" in table) == busy


def test_train_shapes_choose_the_timed_batches_also_in_the_phase_process(tmp_path, capsys):
    """`--train_shapes` reaches the training phase's own process (settings travel as JSON there) and sets the timed
    batches; a shape that is not BATCHxSOURCExTARGET is a usage error naming the argument."""
    out = tmp_path / "bench.json"
    assert load_script().main(["--presets", "tiny", "--phases", "train", "--repeats", "1", "--no_ctranslate2",
                               "--train_shapes", "2x6x5", "3X4x4", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    timed = {(r["implementation"], r["batch"], r["source_length"], r["target_length"])
             for r in records if r["phase"] == "train"}
    assert timed == {(name, *shape) for name in ("ours", "marian") for shape in ((2, 6, 5), (3, 4, 4))}
    capsys.readouterr()
    for bad in ("2x6", "0x6x6", "2x6xten"):
        with pytest.raises(SystemExit) as exit_info:
            load_script().main(["--train_shapes", bad])
        assert exit_info.value.code == 2
        assert f"--train_shapes: {bad!r} is not BATCHxSOURCExTARGET" in capsys.readouterr().err
    # Refused before minutes of measuring (a folder as --json failed each measurement's progress write, then the run).
    (tmp_path / "folder.json").mkdir()
    preset = tmp_path / "my-preset.json"
    preset.write_text((REPO / "configs" / "transformer-tiny.json").read_text())
    for args, message in [(["--json", str(tmp_path / "folder.json")], "is a folder, not a file"),
                          (["--json", str(tmp_path / "no" / "b.json")], "does not exist"),
                          (["--presets", "tiny", "huge"], "No model preset at"), (["--device", "gpu7"], "not a device name"),
                          # a preset it reads: the JSON, written after the first measurement, replaced the preset
                          (["--presets", str(preset), "--json", str(preset), "--phases", "matmul", "--quick"],
                           f"is the same file as --presets {preset}")]:
        with pytest.raises(SystemExit) as exit_info:
            load_script().main(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, args
    assert preset.read_text() == (REPO / "configs" / "transformer-tiny.json").read_text()


def test_a_run_cut_short_keeps_the_presets_it_finished_in_its_json(monkeypatch, tmp_path):
    """The JSON is written after each measurement (atomically): a run stopped in its second preset keeps the first."""
    real = benchmark.run_train

    def stopped_in_base(run, preset, *args):
        if preset == "base":
            raise KeyboardInterrupt
        return real(run, preset, *args)

    monkeypatch.setattr(benchmark, "run_train", stopped_in_base)
    monkeypatch.setattr(BenchmarkSettings, "train_shapes", lambda self: [(2, 6, 6)])
    out = tmp_path / "bench.json"
    assert load_script().main(["--presets", "tiny", "base", "--phases", "train", "--repeats", "1", "--json", str(out),
                               "--in_process"]) == 130  # Ctrl-C: one line, no traceback
    partial = json.loads(out.read_text())
    assert partial["complete"] is False
    assert {(r["phase"], r["preset"]) for r in partial["records"]} == {
        ("matmul_peak", None), ("matmul_peak", "tiny"), ("train", "tiny"), ("matmul_peak", "base")}
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"], "no temporary file left behind"


@pytest.mark.slow
def test_isolated_phase_groups_run_in_fresh_processes_and_a_crash_costs_its_own_group_only():
    """`--in_process` off (the script's default): each preset's training runs in a process of its own, which
    measures the matmul peak again just before it and divides by the higher of its own and the parent's; a group
    whose process dies (here: a preset that does not exist) is a failure of its own, and the next preset is still
    measured."""
    settings = BenchmarkSettings(presets=("no-such-preset", "tiny"), phases=("train",), quick=True, repeats=1,
                                 progress=False, isolate=True)
    result = run_benchmark(settings)
    assert result["failures"] == ["no-such-preset train failed: its process ended with exit status 1 (its error is on "
                                  "stderr above)"]
    peaks = {r["preset"]: r for r in result["records"] if r["phase"] == "matmul_peak"}
    train = {r["implementation"]: r for r in result["records"] if r["phase"] == "train"}
    assert set(train) == {"ours", "marian"} and all(r["preset"] == "tiny" for r in train.values())
    assert set(peaks) == {None, "tiny"} and peaks[None]["process"] == os.getpid()
    assert {r["process"] for r in train.values()} == {peaks["tiny"]["process"]} != {os.getpid()}
    highest = max(peak["flops_per_second"] for peak in peaks.values())
    for r in train.values():
        assert r["matmul_peak_flops_per_second"] == highest
        assert r["mfu"] == pytest.approx(r["achieved_flops_per_second"] / highest)
    assert "ran in a fresh process each" in format_table(result)


def test_a_phase_group_process_that_hangs_is_killed_and_its_records_so_far_are_kept(monkeypatch, tmp_path):
    hang = ("import json, sys, time; sys.stdin.read(); "
            "print(json.dumps({'record': {'implementation': 'ours', 'phase': 'train', 'preset': 'tiny'}}), flush=True); "
            "open(sys.argv[1], 'w').write(str(__import__('os').getpid())); time.sleep(600)")
    monkeypatch.setattr(benchmark, "PHASE_GROUP_CODE", hang)
    pid_file = tmp_path / "hung-group-pid"
    real_popen = subprocess.Popen
    monkeypatch.setattr(benchmark.subprocess, "Popen", lambda command, **kw: real_popen([*command, str(pid_file)], **kw))
    settings = BenchmarkSettings(presets=("tiny",), phases=("train",), repeats=1, progress=False, isolate=True,
                                 silence_timeout=3)
    run = benchmark.Run(settings)
    started = time.perf_counter()
    benchmark.run_phase_group_in_a_process(run, benchmark.run_training_phases, "tiny", {"train"})
    assert time.perf_counter() - started < 60
    assert run.failures == ["tiny train failed: its process sent no result for 3 s "
                            "(BenchmarkSettings.silence_timeout) and was killed"]
    assert [r["implementation"] for r in run.records] == ["ours"]
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(pid_file.read_text()), 0)


def test_compiled_training_is_a_column_of_its_own(monkeypatch):
    """`--compile on` (the default on a GPU) adds `ours+compile`, the training loop's `compile: true`, beside the eager
    step, with its own MFU in the table. (The compiled step itself is tested in test_training.py.)"""
    compiled = []
    monkeypatch.setattr(training, "compiled_for_training", lambda model: compiled.append(model) or model)
    monkeypatch.setattr(BenchmarkSettings, "train_shapes", lambda self: [(2, 6, 6)])
    settings = BenchmarkSettings(presets=("tiny",), phases=("train",), repeats=1, progress=False, compile_training=True)
    result = run_benchmark(settings)
    train = {r["implementation"]: r for r in result["records"] if r["phase"] == "train"}
    assert set(train) == {"ours", "ours+compile", "marian"} and len(compiled) == 1
    assert train["ours+compile"]["mfu"] > 0
    row = next(line for line in format_table(result).splitlines() if "same, ours compiled" in line)
    assert "| tiny" in row and f"MFU {train['ours+compile']['mfu']:.0%}" in row
    assert BenchmarkSettings(device="cuda").compiles and not BenchmarkSettings().compiles


def test_a_compiler_failure_costs_the_compiled_row_only(monkeypatch):
    def failing_compile(model):
        def compiled(**batch):
            raise RuntimeError("triton: no working compiler")
        return compiled

    monkeypatch.setattr(training, "compiled_for_training", failing_compile)
    monkeypatch.setattr(BenchmarkSettings, "train_shapes", lambda self: [(2, 6, 6), (2, 8, 8)])
    settings = BenchmarkSettings(presets=("tiny",), phases=("train",), repeats=1, progress=False, compile_training=True)
    result = run_benchmark(settings)
    assert result["failures"] == ["tiny train, ours+compile warm-up failed: RuntimeError: triton: no working compiler"]
    train = [(r["implementation"], r["source_length"]) for r in result["records"] if r["phase"] == "train"]
    assert sorted(train) == [("marian", 6), ("marian", 8), ("ours", 6), ("ours", 8)]


def test_half_precision_runs_report_the_float32_check_and_the_agreement(monkeypatch):
    """On a GPU the timed decode is bf16: the float32 check says whether both compute the same function, and the
    bf16 run reports how many tokens agree instead of calling a rounding flip a mismatch."""
    monkeypatch.setattr(BenchmarkSettings, "dtype", property(lambda self: torch.bfloat16))
    monkeypatch.setattr(BenchmarkSettings, "decode_batches", lambda self: [2])
    real = benchmark.decode_ours

    def flip_in_bf16(model, input_ids, attention_mask, num_beams, sample=False):
        rows = real(model, input_ids, attention_mask, num_beams, sample)
        if model.dtype == torch.bfloat16:
            rows[1][5] = (rows[1][5] + 1) % model.config.vocab_size or 4
        return rows

    monkeypatch.setattr(benchmark, "decode_ours", flip_in_bf16)
    settings = BenchmarkSettings(presets=("tiny",), phases=("decode",), repeats=1, progress=False, use_ctranslate2=False)
    result = run_benchmark(settings)
    ours = [r for r in result["records"] if r["implementation"] == "ours"]
    assert len(ours) == 3 and all(r["float32_token_check"]["match"] for r in ours)
    assert all(r["dtype"] == "bfloat16" and r["token_check"]["mismatched_tokens"] == 1 for r in ours)
    table = format_table(result)
    assert table.count("float32: ours=Marian exact; bfloat16: 63/64 tok agree (1/2 seqs identical)") == 3
    assert result["failures"] == []  # a rounding flip in bf16 is no failure
    # ... but a float32 mismatch is one, in whatever dtype the run is timed.
    monkeypatch.setattr(benchmark, "decode_ours", lambda *args: [[4] * 32 for _ in range(2)])
    result = run_benchmark(settings)
    assert result["failures"] == [f"tiny {phase} batch 2: ours's tokens differ from Marian's in 64/64; its speed is "
                                  "not comparable" for phase in ("decode_greedy", "decode_beam4", "decode_sample")]


def test_marians_training_step_is_the_one_transformers_trainer_takes(tmp_path):
    """Marian's side of the training rows takes the step of transformers' Trainer: its default optimizer (fused
    AdamW; weight decay 0) and its gradient clipping at norm 1. (Until the eleventh session it took torch's unfused
    Adam and no clipping, ~0.1 s slower a base step, which counted against Marian.) Its loss is ours, label-smoothed
    by 0.1 (until the twenty-first session plain cross-entropy, a little cheaper). The same two steps through the
    Trainer's own optimizer, clipping and `LabelSmoother` give the same weights."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
    from transformers.models.marian.modeling_marian import shift_tokens_right

    _, marian = benchmark.build_pair("tiny", seed=0, vocab_size=300)
    reference = copy.deepcopy(marian).train()
    batch = benchmark.train_batch(300, 4, 9, 7, seed=0)
    step = benchmark.marian_train_step(marian.train(), "cpu")
    arguments = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=5e-5, weight_decay=0.0,
                                         adam_beta1=benchmark.ADAM_BETAS[0], adam_beta2=benchmark.ADAM_BETAS[1],
                                         adam_epsilon=benchmark.ADAM_EPS, lr_scheduler_type="constant", report_to=[],
                                         label_smoothing_factor=0.1)
    trainer = Seq2SeqTrainer(model=reference, args=arguments)
    optimizer = trainer.create_optimizer()
    assert optimizer.defaults.get("fused") is True
    decoder_input_ids = shift_tokens_right(batch["labels"], marian.config.pad_token_id, marian.config.decoder_start_token_id)
    for seed in range(2):  # the same dropout masks in both
        torch.manual_seed(seed)
        step(batch)
        torch.manual_seed(seed)
        outputs = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            decoder_input_ids=decoder_input_ids)
        trainer.label_smoother(outputs, batch["labels"], shift_labels=False).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), arguments.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    for (name, ours), theirs in zip(marian.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=name)


def test_compare_tokens_counts_sequences_and_positions():
    assert compare_tokens([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == {
        "match": True, "sequences": 2, "mismatched_sequences": 0, "tokens": 5, "mismatched_tokens": 0}
    check = compare_tokens([[1, 2, 3], [4, 5]], [[1, 9, 3], [4, 5, 6]])
    assert not check["match"] and check["mismatched_sequences"] == 2 and check["mismatched_tokens"] == 2


def test_alternate_interleaves_and_a_call_with_fewer_repeats_drops_out():
    order = []
    calls = {name: (lambda name=name: order.append(name) or name.upper()) for name in ("ours", "marian", "ct2")}
    outputs = {}
    times = benchmark.alternate(calls, {"ours": 3, "marian": 1, "ct2": 3}, "cpu", first_outputs=outputs)
    assert order == ["ours", "marian", "ct2", "ct2", "ours", "ours", "ct2"]
    assert {name: len(t) for name, t in times.items()} == {"ours": 3, "marian": 1, "ct2": 3}
    assert outputs == {"ours": "OURS", "marian": "MARIAN", "ct2": "CT2"}
    order.clear()
    assert {name: len(t) for name, t in benchmark.alternate(calls, 2, "cpu").items()} == dict.fromkeys(calls, 2)
    assert order == ["ours", "marian", "ct2", "ct2", "marian", "ours"]


def test_training_flops_formula_matches_torch_flop_counter():
    """The analytic MFU numerator equals what torch counts for forward + backward (eager attention, exact)."""
    from torch.utils.flop_counter import FlopCounterMode

    from modeling_seq2seq import Seq2SeqTransformerForConditionalGeneration
    from modeling_seq2seq.presets import load_preset

    config = load_preset("tiny", vocab_size=500, dropout=0.0)
    config._attn_implementation = "eager"
    model = Seq2SeqTransformerForConditionalGeneration(config).train()
    batch = benchmark.train_batch(500, 3, 10, 7, seed=0)
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    assert counter.get_total_flops() == training_flops(config, 3, 10, 7)


def test_sentence_lengths_are_a_realistic_mix():
    source, target = benchmark.sentence_lengths(2000, seed=0)
    assert source.min() >= 5 and source.max() <= 120 and target.min() >= 5 and target.max() <= 120
    assert 18 <= float(source.mean()) <= 32 and source.std() > 8


def test_pinned_length_restores_the_generation_config():
    from modeling_seq2seq import Seq2SeqTransformerForConditionalGeneration
    from modeling_seq2seq.presets import load_preset

    model = Seq2SeqTransformerForConditionalGeneration(load_preset("tiny", vocab_size=100))
    before = (model.generation_config.min_new_tokens, model.generation_config.max_new_tokens)
    with benchmark.pinned_length([model], 7):
        assert model.generation_config.min_new_tokens == model.generation_config.max_new_tokens == 7
    assert (model.generation_config.min_new_tokens, model.generation_config.max_new_tokens) == before


def test_matmul_peak_is_the_fastest_kernel_and_each_kernel_computes_the_product():
    """The MFU's denominator counts oneDNN too: our model's products run on it, so a peak of torch.matmul alone
    could put the MFU above what the machine allows."""
    a, b = torch.randn(64, 64, dtype=torch.float64), torch.randn(64, 64, dtype=torch.float64)
    for name, kernel in benchmark.matmul_kernels("cpu").items():
        assert torch.allclose(kernel(a.float(), b.float(), b.t().contiguous().float()).double(), a @ b, atol=1e-4), name
    peak = benchmark.matmul_peak("cpu", (128, 256), repeats=2)
    assert set(peak["per_kernel"]) == set(benchmark.matmul_kernels("cpu")) >= {"torch.matmul", "onednn"}
    for n in (128, 256):
        assert peak["per_size"][n] == max(rates[n] for rates in peak["per_kernel"].values())
    assert peak["flops_per_second"] == max(peak["per_size"].values())


@pytest.mark.skipif(not benchmark.ctranslate2_available(), reason="ctranslate2 is not installed")
def test_ctranslate2_runs_in_a_process_of_its_own_with_the_same_translations(tmp_path):
    import ctranslate2

    from modeling_seq2seq.export import synthetic_tokenizer

    with pytest.raises(RuntimeError, match="CTranslate2: .*no-such-model"):
        benchmark.CTranslate2Process(model_path=str(tmp_path / "no-such-model"), device="cpu")
    ours, marian = benchmark.build_pair("tiny", seed=0, vocab_size=300)
    config = ours.config
    tokenizer = synthetic_tokenizer(config.vocab_size, config.pad_token_id, config.bos_token_id, config.eos_token_id)
    settings = BenchmarkSettings(presets=("tiny",), threads=1)
    translator = benchmark.make_translator(marian, tokenizer, settings, str(tmp_path / "ct2"))
    try:
        assert isinstance(translator, benchmark.CTranslate2Process) and translator.process.pid != os.getpid()
        ids, _, lengths = benchmark.decode_inputs(config.vocab_size, 3, seed=0)
        source = [tokenizer.convert_ids_to_tokens(row[:n]) for row, n in zip(ids.tolist(), lengths)]
        here = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", intra_threads=1)
        for num_beams in (1, 4):
            expected = [r.hypotheses for r in benchmark.translate_ctranslate2(here, source, num_beams)]
            assert [r.hypotheses for r in benchmark.translate_ctranslate2(translator, source, num_beams)] == expected
        sampled = [r.hypotheses[0] for r in benchmark.translate_ctranslate2(translator, source, 1, sample=True)]
        assert [len(tokens) for tokens in sampled] == [32] * 3
    finally:
        translator.close()
    assert translator.process.returncode == 0
    with pytest.raises(RuntimeError, match="is closed"):
        translator.translate_batch(source)

    hung = benchmark.make_translator(marian, tokenizer, settings, str(tmp_path / "ct2"))
    hung.timeout = 1
    os.kill(hung.process.pid, signal.SIGSTOP)  # a process that never answers is killed, not waited for forever
    with pytest.raises(RuntimeError, match="did not answer within 1 s"):
        hung.translate_batch(source)
    assert hung.process.returncode is not None
    dead = benchmark.make_translator(marian, tokenizer, settings, str(tmp_path / "ct2"))
    dead.process.kill()
    with pytest.raises(RuntimeError, match="CTranslate2 process ended"):
        dead.translate_batch(source)
    assert dead.process.returncode is not None


def test_a_record_is_the_median_of_its_repeats_and_tokens_per_second_divides_by_it():
    """Reference: statistics.median (an even count: the mean of the middle two; neither the minimum nor the mean)."""
    import statistics

    run = benchmark.Run(BenchmarkSettings(progress=False))
    seconds = [3.0, 1.0, 2.5, 10.0]
    record = run.add("ours", "tiny", "train", 2, seconds, 1000, extra_field=7)
    assert record["median_seconds"] == statistics.median(seconds) == 2.75
    assert record["min_seconds"] == 1.0 and record["repeats"] == 4 and record["seconds"] == seconds
    assert record["tokens_per_second"] == pytest.approx(1000 / 2.75) and record["tokens"] == 1000
    assert (record["implementation"], record["preset"], record["phase"], record["batch"]) == ("ours", "tiny", "train", 2)
    assert record["extra_field"] == 7 and run.records == [record]


def test_the_mfu_divides_by_the_highest_peak_measured_so_far(monkeypatch):
    peaks = iter([300e9, 200e9, 400e9])
    monkeypatch.setattr(benchmark, "matmul_peak", lambda device, sizes, repeats: {
        "flops_per_second": next(peaks), "per_size": {}, "per_kernel": {}, "dtype": "float32"})
    run = benchmark.Run(BenchmarkSettings(progress=False))
    seen = []
    for _ in range(3):
        benchmark.run_matmul(run, "tiny")
        seen.append(run.peak_flops)
    assert seen == [300e9, 300e9, 400e9]
    # A peak measured in a preset's own process counts for the later presets too (the parent kept its own).
    run.take({"phase": "matmul_peak", "flops_per_second": 500e9})
    run.take({"phase": "matmul_peak", "flops_per_second": 100e9})
    assert run.peak_flops == 500e9 and len(run.records) == 5


def test_train_records_count_source_and_target_tokens_and_the_mfu_is_the_analytic_flops_over_the_median(monkeypatch):
    import statistics

    from modeling_seq2seq.presets import load_preset

    config = load_preset("tiny", vocab_size=500)
    monkeypatch.setattr(BenchmarkSettings, "train_shapes", lambda self: [(3, 10, 7)])
    run = benchmark.Run(BenchmarkSettings(progress=False, repeats=3))
    run.peak_flops = 1e12
    seen = []
    steps = {"ours": lambda batch: seen.append(batch), "marian": lambda batch: None}
    monkeypatch.setattr(benchmark, "alternate", lambda calls, repeats, device: {
        name: [0.3, 0.1, 0.2] for name in calls})  # median 0.2 (min 0.1, mean 0.2; a 4th would part them)
    benchmark.run_train(run, "tiny", run.settings.plan("tiny"), steps, config)
    assert seen[0]["input_ids"].shape == (3, 10) and seen[0]["labels"].shape == (3, 7)
    for record in run.records:
        assert record["tokens"] == 3 * (10 + 7)
        median = statistics.median(record["seconds"])
        assert median == 0.2 and record["seconds"] == [0.3, 0.1, 0.2]
        flops = 3 * (  # by hand from the docstring's shapes: d=D, f=F, V, B=3, S=10, T=7
            config.encoder_layers * (2 * 3 * 10 * (4 * config.d_model**2 + 2 * config.d_model * config.encoder_ffn_dim)
                                     + 4 * 3 * 10 * 10 * config.d_model)
            + config.decoder_layers * (2 * 3 * 7 * (6 * config.d_model**2 + 2 * config.d_model * config.decoder_ffn_dim)
                                       + 2 * 3 * 10 * 2 * config.d_model**2 + 4 * 3 * 7 * 7 * config.d_model
                                       + 4 * 3 * 7 * 10 * config.d_model)
            + 2 * 3 * 7 * config.d_model * 500)
        assert record["flops"] == flops
        assert record["achieved_flops_per_second"] == pytest.approx(flops / 0.2)
        assert record["mfu"] == pytest.approx(flops / 0.2 / 1e12)


def test_the_length_mix_counts_real_tokens_only_and_token_batches_pad_less():
    """tokens/s of the length mix counts the tokens that are not padding (in the batches the step got); the
    `ours+token_batches` step gets the sampler's length-sorted batches, which pad less than the random ones."""
    run = benchmark.Run(BenchmarkSettings(progress=False, repeats=1))
    handed = {"ours": [], "marian": []}
    steps = {name: (lambda batch, name=name: handed[name].append(batch)) for name in handed}
    benchmark.run_length_mix(run, "tiny", {"length_mix_sentences": 96, "length_mix": 1}, steps, pad_token_id=0, vocab=100)
    records = {r["implementation"]: r for r in run.records}
    assert set(records) == {"ours+token_batches", "ours+padded", "marian+padded"}

    def real(batches):
        return sum(int((b["input_ids"] != 0).sum()) + int((b["labels"] != -100).sum()) for b in batches)

    warm_up = 2
    token_batches = handed["ours"][warm_up * 2:][: records["ours+token_batches"]["batches"]]
    padded = handed["marian"][warm_up:]
    assert real(token_batches) == real(padded) == records["marian+padded"]["tokens"]
    for record in records.values():
        assert record["tokens"] == real(padded)
        assert record["tokens_per_second"] == pytest.approx(record["tokens"] / record["median_seconds"])
    slots = sum(b["input_ids"].numel() + b["labels"].numel() for b in padded)
    assert records["marian+padded"]["padding_fraction"] == pytest.approx(1 - real(padded) / slots)
    assert records["ours+token_batches"]["padding_fraction"] < 0.75 * records["ours+padded"]["padding_fraction"]
    assert all(len(b["input_ids"]) == 16 for b in padded[:-1])


def test_ctranslate2s_token_check_compares_it_with_marian(monkeypatch):
    """The pre-timing parity check of CTranslate2: its tokens against Marian's (not against its own); and tokens/s
    counts the generated tokens (batch x 32, whatever the beam)."""
    if not benchmark.ctranslate2_available():
        pytest.skip("ctranslate2 is not installed")
    real = benchmark.decode_ctranslate2

    def wrong(*args):
        rows = real(*args)
        rows[0][4] = rows[0][4] + 1 if rows[0][4] < 200 else 5
        return rows

    monkeypatch.setattr(benchmark, "decode_ctranslate2", wrong)
    monkeypatch.setattr(BenchmarkSettings, "decode_batches", lambda self: [1])
    result = run_benchmark(BenchmarkSettings(presets=("tiny",), phases=("decode",), repeats=1, progress=False))
    decoded = [r for r in result["records"] if r["phase"].startswith("decode") and r["phase"] != "decode_sample"]
    assert {r["implementation"] for r in decoded} == {"ours", "marian", "ctranslate2"}
    for r in decoded:
        assert r["tokens"] == 1 * 32
        assert r["token_check"]["match"] is (r["implementation"] != "ctranslate2"), r
    assert all(r["token_check"]["mismatched_tokens"] == 1 for r in decoded if r["implementation"] == "ctranslate2")


def test_exact_float32_uses_the_setting_that_does_not_raise_beside_transformers_tf32():
    """The GPU token check and the GPU tests turn TF32 off; the legacy `allow_tf32` raised once transformers'
    `enable_tf32` (TrainingArguments(tf32=...)) had set torch's newer `fp32_precision`. Restored after."""
    from modeling_seq2seq.benchmark import exact_float32

    saved = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision
    torch.backends.fp32_precision = "tf32"
    try:
        before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision
        with exact_float32():
            assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision) == ("ieee", "ieee")
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision) == before == ("tf32", "tf32")
    finally:
        torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision = saved
