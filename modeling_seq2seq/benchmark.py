"""Side-by-side speed benchmark (issue 6): our model vs. its `MarianMTModel` twin vs. CTranslate2.

`run_benchmark(BenchmarkSettings(...))` builds, per preset, our model with random weights, its Marian twin
(`convert.to_marian`: same weights, same numbers) and, when `ctranslate2` is importable, a CTranslate2 model
converted from that twin (`export.convert_marian_to_ctranslate2`), which runs in a process of its own
(`CTranslate2Process`: in torch's process it would share torch's OpenMP runtime and slow both). It measures them
in one run, alternating implementations (the order flips every repeat), after warm-up, and reports medians over
repeats:

- `matmul_peak`: the machine's measured matrix-multiply peak (large square matrices, best of N, fp32 on CPU, bf16
  on GPU; the faster of torch.matmul and, on a CPU, oneDNN's kernel that our model uses), the denominator of the
  model FLOPs utilisation (MFU). Measured at the start and again just before each preset's training; the MFU
  divides by the highest measured up to then, so that a slow phase of the machine cannot inflate it.
- `train`: forward + backward + Adam step on a fixed batch of 16 x 32 source and 16 x 32 target tokens (on GPU also
  128 x 64 + 128 x 64 and the paper's ~25k-token batches, 200 x 128 + 200 x 128), fp32 on CPU, bf16 autocast on
  GPU; tokens/s counts source + target tokens. "Ours" runs the step of our training loop (`training.compute_loss`,
  `training.make_optimizer_and_scheduler`: fused Adam(0.9, 0.98, 1e-9) with the inverse-square-root schedule, and
  the gradient clipped at norm 1); Marian runs the step transformers' Trainer takes (backward, `clip_grad_norm_` at
  1.0, and the Trainer's default fused AdamW, here as fused `torch.optim.Adam(betas=(0.9, 0.98), eps=1e-9)`), with
  the same loss (label smoothing 0.1, through `F.cross_entropy` on its logits). Train mode, the preset's dropout,
  both.
  Each record carries the step's analytic FLOPs and its MFU (see `training_flops`).
- `train_memory`: peak memory of the training step. CPU: a fresh subprocess per implementation builds the model
  and the optimizer and runs 2 steps; `peak_rss_mb` is its `ru_maxrss`, `step_memory_mb` the peak minus the RSS
  after imports (weights, gradients, Adam moments, activations, allocator slack). GPU: `max_memory_allocated`.
- `train_length_mix`: training on sentence pairs of realistic, varying length (source lengths log-normal like WMT
  sentences, median 22 tokens, clipped to 5..120; target = source x log-normal(0, 0.15)); tokens/s counts only
  non-padding tokens. `ours+token_batches`: `data.TokenBatchSampler` (length-sorted token batches, `max_tokens` =
  the mean padded size of the padded batches, so both loaders hand the model batches of the same average size);
  `ours+padded` / `marian+padded`: what a `Seq2SeqTrainer` user gets (random order, 16 sentences per batch, padded
  to the longest). Same sentences, one pass each, batches collated beforehand.
- `forward`: one evaluation forward without gradients (`model(input_ids, attention_mask, labels)` under
  `torch.no_grad()`, eval mode: logits and loss, as a `Seq2SeqTrainer` evaluation computes them) on the training
  shapes' batches, in the decoding dtype. The logits of ours and Marian are compared first (`logits_max_abs_diff`;
  more than 1e-3 in float32 is a failure); tokens/s counts source + target tokens.
- `decode_greedy` / `decode_beam4` / `decode_sample`: `generate` on batch 1 and 8 (GPU: also 32) of ~32-token
  sources, exactly 32 new tokens (`min_new_tokens = max_new_tokens = 32`; CTranslate2: `min/max_decoding_length =
  32`), length penalty 0.6 for beam search; `decode_sample` is multinomial sampling with top-k 50 (transformers'
  default), one beam, the random generator seeded alike before each `generate` (CTranslate2: `sampling_topk=50`).
  Before timing, every implementation decodes the inputs once (this is also the warm-up) and the tokens are
  compared: ours vs. Marian exactly (sampling too: the same draws), CTranslate2 vs. Marian token by token (not when
  sampling: its generator is its own); the result is in each record's `token_check` and in the table's last column.
  When the timed dtype is not float32 (bf16 on GPU), ours and Marian are also compared in float32 first
  (`float32_token_check`), and the bf16 comparison is reported as the share of tokens that agree. tokens/s counts
  generated tokens (batch x 32). Our decode loop's matrix products are also timed alone, in the same alternation
  (`decoder_products_ours`; on a CPU only: a GPU replays the recorded step, and products launched one by one would
  time the launches); ours' record holds that as `decoder_products_seconds`, and the table gives the step time both
  ways. (Greedy search reads a bfloat16 or int8 copy of the output projection and checks its few candidates in
  float32, `GreedyScreen`: its step can take less than these float32 products.)
- `translate_file`: `scripts/translate.py`'s code path (`training.translate_texts`: sort by length, batches of 64,
  beam 4, restore the order) vs. a plain loop over `MarianMTModel.generate` one sentence at a time in file order,
  on sentences of mixed length, both through the same tokenizer. An untrained model never ends a sentence, and
  translate.py's length rule (longest in batch + 50) would make outputs depend on the batch, so both models'
  generation configs pin 32 new tokens (`min_new_tokens = max_new_tokens`). With CTranslate2, also its own batching
  (`translate_batch` over the whole file, `max_batch_size` 64, within which it sorts by length too; decoding length
  pinned likewise). Each implementation's outputs are compared with Marian's per sentence (`output_check`). The
  close pair, ours and CTranslate2, is timed three times (alternating, medians); Marian's loop, 7 to 19 times
  slower, once at base (twice at tiny), in the first rounds.

On Linux the process keeps freed memory for reuse, as our training loop does (`training.keep_freed_memory`); it
applies to every implementation alike.

With `isolate` (the script's default; `--in_process` turns it off), each preset's decoding phases (`decode`,
`translate_file`, `forward`) and its training phases (`train`, `length_mix`) run in a fresh Python process each, which
sends its records back as it measures them. Ours and Marian then start every group from a new process, as
CTranslate2 always does, and no measurement depends on what an earlier phase left behind (heap, threads, compiled
code). The parent measures the matmul peak at the start and hands it to the training processes, which measure it again.
A group process that sends no record for `silence_timeout` seconds (30 minutes) is taken for hung and killed:
its records so far stay, and the run goes on with the next group.

Speed is measured, never asserted. Times are wall-clock (`time.perf_counter`, with `torch.cuda.synchronize` on
GPU). The machine (CPU model, threads, load average, versions) is recorded with the results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]

# The paper's en-de vocabulary for base/big; a smaller one for the tiny preset.
VOCAB_SIZES = {"tiny": 8000, "base": 37000, "big": 37000}
DECODE_NEW_TOKENS = 32
DECODE_SOURCE_LENGTH = 32
LENGTH_PENALTY = 0.6
SAMPLING_TOP_K, SAMPLING_SEED = 50, 0  # transformers' default top-k
PADDED_BATCH_SIZE = 16  # Seq2SeqTrainer's per_device_train_batch_size, scaled to a 2-core CPU
TRANSLATE_BATCH_SIZE = 64  # scripts/translate.py's default --batch_size
ADAM_BETAS, ADAM_EPS = (0.9, 0.98), 1e-9
PHASES = ("matmul", "forward", "decode", "train", "memory", "length_mix", "translate_file")


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


@dataclass
class BenchmarkSettings:
    """What to run. `quick`: tiny preset, few repeats (under a minute on 2 CPU cores)."""

    device: str = "cpu"
    threads: int = 2
    quick: bool = False
    presets: tuple[str, ...] | None = None  # None: tiny+base (CPU), tiny+base+big (GPU), tiny when quick
    phases: tuple[str, ...] = PHASES
    use_ctranslate2: bool = True
    seed: int = 0
    repeats: int | None = None  # override every repeat count (tests)
    length_mix_sentences: int | None = None  # override the sentence count of `train_length_mix`
    file_sentences: int | None = None  # override the sentence count of `translate_file`
    progress: bool = True
    compile_training: bool | None = None  # also time `ours+compile` (the loop's `compile: true`); None: on a GPU
    training_shapes: tuple[tuple[int, int, int], ...] | None = None  # (batch, source, target); None: `train_shapes`
    isolate: bool = False  # each preset's decoding phases and its training phases in a fresh process each
    silence_timeout: float = 1800.0  # seconds a phase-group process may go without a record before it is killed

    @property
    def compiles(self) -> bool:
        return self.is_cuda if self.compile_training is None else self.compile_training

    def resolved_presets(self) -> tuple[str, ...]:
        if self.presets:
            return tuple(self.presets)
        if self.quick:
            return ("tiny",)
        return ("tiny", "base", "big") if self.is_cuda else ("tiny", "base")

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def plan(self, preset: str) -> dict:
        """Repeat counts and workload sizes for one preset (chosen to keep the full CPU run near 5 minutes)."""
        large = preset != "tiny"
        if self.quick:
            plan = dict(train=3, forward=3, decode=3, length_mix=1, file=1, file_fast=1, length_mix_sentences=64,
                        file_sentences=24)
        elif self.is_cuda:  # Marian's per-sentence loop takes ~0.3 s a sentence on a GPU: 32 sentences
            plan = dict(train=10, forward=10, decode=5, length_mix=3, file=1, file_fast=3, length_mix_sentences=2048,
                        file_sentences=32)
        elif large:
            plan = dict(train=5, forward=7, decode=5, length_mix=1, file=1, file_fast=3, length_mix_sentences=192,
                        file_sentences=32)
        else:
            plan = dict(train=7, forward=7, decode=5, length_mix=3, file=2, file_fast=3, length_mix_sentences=384,
                        file_sentences=128)
        if self.repeats is not None:
            plan.update(train=self.repeats, forward=self.repeats, decode=self.repeats, length_mix=self.repeats,
                        file=self.repeats, file_fast=self.repeats)
        if self.length_mix_sentences is not None:
            plan["length_mix_sentences"] = self.length_mix_sentences
        if self.file_sentences is not None:
            plan["file_sentences"] = self.file_sentences
        return plan

    def train_shapes(self) -> list[tuple[int, int, int]]:
        """(batch, source length, target length) of the fixed-shape training measurements. On a GPU also larger
        token batches, up to the paper's (Section 5.1: ~25,000 source and ~25,000 target tokens per batch)."""
        if self.training_shapes:
            return [tuple(shape) for shape in self.training_shapes]
        return [(16, 32, 32), (128, 64, 64), (200, 128, 128)] if self.is_cuda else [(16, 32, 32)]

    def decode_batches(self) -> list[int]:
        return [1, 8, 32] if self.is_cuda else [1, 8]

    @property
    def dtype(self) -> torch.dtype:
        """Decoding dtype (weights); training keeps fp32 weights and uses autocast on GPU."""
        return torch.bfloat16 if self.is_cuda else torch.float32


# ----------------------------------------------------------------------------------------------------------
# Machine, timing
# ----------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(settings: BenchmarkSettings) -> dict:
    import transformers

    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": settings.threads,
        "torch_num_threads": torch.get_num_threads(),
        "device": settings.device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "ctranslate2_version": None,
        "load_average_start": list(os.getloadavg()),
    }
    with contextlib.suppress(ImportError):
        import ctranslate2

        info["ctranslate2_version"] = ctranslate2.__version__
    if settings.is_cuda:
        info["gpu"] = torch.cuda.get_device_name(torch.device(settings.device))
        info["cuda_version"] = torch.version.cuda
    return info


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def timed(function: Callable[[], object], device: str, outputs: list | None = None) -> float:
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    elapsed = time.perf_counter() - start
    if outputs is not None:
        outputs.append(result)
    return elapsed


def alternate(calls: dict[str, Callable[[], object]], repeats: int | dict[str, int], device: str,
              first_outputs: dict | None = None) -> dict[str, list[float]]:
    """Time each call `repeats` times (or `repeats[name]` times), interleaved (A B C, C B A, A B C, ...) so that drift
    hits all alike; a call whose repeats are done drops out of the later rounds.

    With `first_outputs` (a dict), each call's result of the first repeat is stored in it under the call's name.
    """
    counts = repeats if isinstance(repeats, dict) else dict.fromkeys(calls, repeats)
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for repeat in range(max(counts.values(), default=0)):
        for name in names if repeat % 2 == 0 else reversed(names):
            if repeat >= counts[name]:
                continue
            keep = [] if first_outputs is not None and repeat == 0 else None
            times[name].append(timed(calls[name], device, keep))
            if keep:
                first_outputs[name] = keep[0]
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; elsewhere the peak so far)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------


def preset_config(preset: str, vocab_size: int | None = None, **overrides):
    from .presets import load_preset

    return load_preset(preset, vocab_size=vocab_size or VOCAB_SIZES.get(preset, 8000), **overrides)


def build_pair(preset: str, seed: int, vocab_size: int | None = None):
    """Our model with random weights and its Marian twin (same weights), both fp32 on the CPU, in eval mode."""
    from . import Seq2SeqTransformerForConditionalGeneration
    from .convert import to_marian

    torch.manual_seed(seed)
    ours = Seq2SeqTransformerForConditionalGeneration(preset_config(preset, vocab_size)).eval()
    marian = to_marian(ours).eval()
    return ours, marian


def marian_config_for(config):
    """The `MarianConfig` `to_marian` builds for `config` (to make a Marian model without building ours first)."""
    from transformers import MarianConfig

    from .convert import SHARED_FIELDS

    return MarianConfig(
        **{f: getattr(config, f) for f in SHARED_FIELDS}, forced_eos_token_id=None, share_encoder_decoder_embeddings=True
    )


def random_ids(generator: torch.Generator, vocab_size: int, shape, low: int = 4) -> torch.Tensor:
    """Random non-special token ids (the first 4 ids are <pad>, <s>, </s>, <unk>)."""
    return torch.randint(low, vocab_size, shape, generator=generator)


def decode_inputs(vocab_size: int, batch: int, seed: int, eos: int = 2, pad: int = 0):
    """A right-padded batch of ~32-token sources (lengths 28..32, the first exactly 32) ending with </s>."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [DECODE_SOURCE_LENGTH] + torch.randint(28, DECODE_SOURCE_LENGTH + 1, (batch - 1,), generator=generator).tolist()
    width = max(lengths)
    ids = random_ids(generator, vocab_size, (batch, width))
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, length - 1] = eos
        ids[row, length:] = pad
        mask[row, :length] = 1
    return ids, mask, lengths


def train_batch(vocab_size: int, batch: int, source_length: int, target_length: int, seed: int, eos: int = 2) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = random_ids(generator, vocab_size, (batch, source_length))
    labels = random_ids(generator, vocab_size, (batch, target_length))
    input_ids[:, -1] = eos
    labels[:, -1] = eos
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def sentence_lengths(count: int, seed: int, low: int = 5, high: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) token lengths like WMT sentences: log-normal (median 22, sigma 0.6) clipped to low..high."""
    rng = np.random.default_rng(seed)
    source = np.clip(np.round(rng.lognormal(math.log(22), 0.6, count)), low, high).astype(np.int64)
    target = np.clip(np.round(source * rng.lognormal(0.0, 0.15, count)), low, high).astype(np.int64)
    return source, target


def mixed_length_examples(count: int, vocab_size: int, seed: int, eos: int = 2) -> list[dict]:
    """Sentence pairs of realistic lengths; every sequence ends with </s> (as our tokenizer makes them)."""
    source_lengths, target_lengths = sentence_lengths(count, seed)
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for s, t in zip(source_lengths.tolist(), target_lengths.tolist()):
        source = random_ids(generator, vocab_size, (s,)).tolist()[:-1] + [eos]
        target = random_ids(generator, vocab_size, (t,)).tolist()[:-1] + [eos]
        examples.append({"input_ids": source, "labels": target})
    return examples


# ----------------------------------------------------------------------------------------------------------
# Training step
# ----------------------------------------------------------------------------------------------------------


def autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ours_train_step(model, device: str, compile: bool = False) -> Callable[[dict], torch.Tensor]:
    """The step of our training loop (`training.Trainer.train_step` without the multi-process bookkeeping); with
    `compile`, the loop's `compile: true` (`training.compiled_for_training`)."""
    from .training import TrainingConfig, compiled_for_training, compute_loss, gradient_norm, make_optimizer_and_scheduler

    optimizer, scheduler = make_optimizer_and_scheduler(model, TrainingConfig(), model.config.d_model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    step_model = compiled_for_training(model) if compile else model

    def step(batch: dict) -> torch.Tensor:
        with autocast(device):
            loss = compute_loss(step_model, batch)
        loss.backward()
        gradient_norm(parameters, 1.0)  # clipped at norm 1, as Marian's step (the loop measures the norm every step)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def marian_train_step(model, device: str) -> Callable[[dict], torch.Tensor]:
    """The step transformers' Trainer takes: loss, backward, the gradient clipped at norm 1 (`max_grad_norm`), and
    its default optimizer, torch's fused AdamW (weight decay 0: Adam), here with the paper's betas and epsilon; the
    loss label-smoothed by 0.1 as ours (torch's `cross_entropy`, cheaper than the Trainer's `LabelSmoother`)."""
    from transformers.models.marian.modeling_marian import shift_tokens_right

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=5e-5, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
    config = model.config

    def step(batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with autocast(device):
            logits = model(**inputs, decoder_input_ids=shift_tokens_right(labels, config.pad_token_id,
                                                                          config.decoder_start_token_id)).logits
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


TRAIN_STEPS = {"ours": ours_train_step, "marian": marian_train_step}


def training_flops(config, batch: int, source_length: int, target_length: int) -> float:
    """Analytic FLOPs of one training step: 3 x the forward pass's matrix-multiply FLOPs (backward = 2 x forward).

    Forward, with d = d_model, f = d_ff, V = vocabulary, B sentences of S source and T target tokens, a multiply-add
    counted as 2 FLOPs:
      encoder, per layer:  2 B S (4 d^2 + 2 d f)          Q, K, V, output projections and the feed-forward
                           + 4 B S^2 d                      Q K^T and (weights) V
      decoder, per layer:  2 B T (6 d^2 + 2 d f)          self-attention Q K V O, cross-attention Q O, feed-forward
                           + 2 B S (2 d^2)                  cross-attention K V (over the source tokens)
                           + 4 B T^2 d + 4 B T S d          self- and cross-attention scores and values
      output projection:   2 B T d V
    Causal self-attention is counted in full (as computed by the kernels). Embedding lookups, LayerNorm, softmax,
    the loss and the Adam update are element-wise and not counted.
    """
    d, V = config.d_model, config.vocab_size
    B, S, T = batch, source_length, target_length
    encoder = config.encoder_layers * (2 * B * S * (4 * d * d + 2 * d * config.encoder_ffn_dim) + 4 * B * S * S * d)
    decoder = config.decoder_layers * (
        2 * B * T * (6 * d * d + 2 * d * config.decoder_ffn_dim) + 2 * B * S * 2 * d * d + 4 * B * T * T * d + 4 * B * T * S * d
    )
    return float(3 * (encoder + decoder + 2 * B * T * d * V))


def matmul_kernels(device: str) -> dict[str, Callable]:
    """The matrix products the machine offers: torch.matmul, and on a CPU also the two of oneDNN that `OneDNNLinear`
    uses (its inner product for the forward product, its matmul primitive for the backward's, where
    `onednn_matmul_keeps_float32`), which on AMD CPUs are faster than the MKL behind torch.matmul. Each computes a @ b."""
    from .modeling_seq2seq import onednn_linear_kernel, onednn_matmul, onednn_matmul_keeps_float32

    kernels = {"torch.matmul": lambda a, b, b_t: torch.matmul(a, b)}
    onednn = onednn_linear_kernel()
    if not device.startswith("cuda") and onednn is not None:
        kernels["onednn"] = lambda a, b, b_t: onednn(a, b_t, None, "none", [], "")
        if onednn_matmul_keeps_float32():
            kernels["onednn matmul"] = lambda a, b, b_t: onednn_matmul(a, b)
    return kernels


def matmul_peak(device: str, sizes: tuple[int, ...], repeats: int) -> dict:
    """Best achieved FLOP/s of a matrix product of square matrices (fp32 on CPU, bf16 on GPU), per size and kernel,
    and the best of all: the peak counts the fastest kernel, so that using it cannot inflate the MFU."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    per_size, per_kernel = {}, {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        b_t = b.t().contiguous()
        for name, kernel in matmul_kernels(device).items():
            kernel(a, b, b_t)  # warm-up
            best = min(timed(lambda: kernel(a, b, b_t), device) for _ in range(repeats))
            per_kernel.setdefault(name, {})[n] = 2 * n**3 / best
        per_size[n] = max(rates[n] for rates in per_kernel.values())
        del a, b, b_t
    return {"flops_per_second": max(per_size.values()), "per_size": per_size, "per_kernel": per_kernel,
            "dtype": str(dtype).replace("torch.", "")}


# ----------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------


def generate_kwargs(num_beams: int, sample: bool = False) -> dict:
    kwargs = dict(num_beams=num_beams, do_sample=sample, min_new_tokens=DECODE_NEW_TOKENS,
                  max_new_tokens=DECODE_NEW_TOKENS)
    if num_beams > 1:
        kwargs["length_penalty"] = LENGTH_PENALTY
    if sample:
        kwargs["top_k"] = SAMPLING_TOP_K
    return kwargs


def decode_transformers(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int,
                        sample: bool = False) -> list[list[int]]:
    if sample:  # the same draws for every implementation that samples as transformers does
        torch.manual_seed(SAMPLING_SEED)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs(num_beams, sample))
    return [row[1:] for row in output.tolist()]  # every new token (exactly 32: no </s> before), padding ids included


def decode_ours(model, input_ids, attention_mask, num_beams, sample=False):
    """Our model's `generate` (whatever path it takes inside)."""
    return decode_transformers(model, input_ids, attention_mask, num_beams, sample)


def decode_marian(model, input_ids, attention_mask, num_beams, sample=False):
    return decode_transformers(model, input_ids, attention_mask, num_beams, sample)


def decoder_products_ours(model, rows: int, steps: int = DECODE_NEW_TOKENS) -> None:
    """Our decode loop's matrix products alone: at each step, every decoder layer's projections and the output
    projection for `rows` rows, through the loop's own `DecodeStepLinear`. Timed beside `generate`, it splits a
    step into the matrix products and everything else (encoder, attention, layer norms, search, Python)."""
    from .decoding_seq2seq import DecodeStepLinear

    weight = model.lm_head.weight
    linear = DecodeStepLinear(model, weight.device, weight.dtype)
    products = [
        module for layer in model.get_decoder().layers
        for module in (layer.self_attn.qkv_proj, layer.self_attn.out_proj, layer.cross_attn.q_proj,
                       layer.cross_attn.out_proj, layer.feed_forward.fc1, layer.feed_forward.fc2)
    ] + [model.lm_head]
    inputs = {n: torch.randn(rows, n, device=weight.device, dtype=weight.dtype) for n in {m.in_features for m in products}}
    with torch.no_grad():
        for _ in range(steps):
            for module in products:
                linear(module, inputs[module.in_features])


def decode_ctranslate2(translator, source_tokens: list[list[str]], num_beams: int, tokenizer,
                       sample: bool = False) -> list[list[int]]:
    results = translate_ctranslate2(translator, source_tokens, num_beams, sample)
    return [tokenizer.convert_tokens_to_ids(result.hypotheses[0]) for result in results]


def translate_ctranslate2(translator, source_tokens: list[list[str]], num_beams: int, sample: bool = False):
    return translator.translate_batch(
        source_tokens,
        beam_size=num_beams,
        length_penalty=LENGTH_PENALTY if num_beams > 1 else 1.0,
        min_decoding_length=DECODE_NEW_TOKENS,
        max_decoding_length=DECODE_NEW_TOKENS,
        return_scores=False,
        **({"sampling_topk": SAMPLING_TOP_K} if sample else {}),
    )


def compare_tokens(reference: list[list[int]], candidate: list[list[int]]) -> dict:
    """Sequence- and token-level agreement of `candidate` with `reference` (a length difference counts as tokens)."""
    mismatched_sequences = mismatched_tokens = total = 0
    for ref, cand in zip(reference, candidate):
        total += max(len(ref), len(cand))
        differing = sum(a != b for a, b in zip(ref, cand)) + abs(len(ref) - len(cand))
        mismatched_tokens += differing
        mismatched_sequences += differing > 0
    if len(reference) != len(candidate):
        mismatched_sequences += abs(len(reference) - len(candidate))
    return {
        "match": mismatched_sequences == 0,
        "sequences": max(len(reference), len(candidate)),
        "mismatched_sequences": mismatched_sequences,
        "tokens": total,
        "mismatched_tokens": mismatched_tokens,
    }


# ----------------------------------------------------------------------------------------------------------
# Translating a file
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def pinned_length(models, new_tokens: int):
    """Make every `generate` of these models produce exactly `new_tokens` tokens (restored afterwards)."""
    saved = [(m.generation_config.min_new_tokens, m.generation_config.max_new_tokens) for m in models]
    try:
        for m in models:
            m.generation_config.min_new_tokens = m.generation_config.max_new_tokens = new_tokens
        yield
    finally:
        for m, (low, high) in zip(models, saved):
            m.generation_config.min_new_tokens, m.generation_config.max_new_tokens = low, high


def translate_file_ours(model, tokenizer, texts: list[str], num_beams: int = 4) -> list[str]:
    """scripts/translate.py's code path."""
    from .training import translate_texts

    return translate_texts(model, tokenizer, texts, batch_size=TRANSLATE_BATCH_SIZE, num_beams=num_beams,
                           length_penalty=LENGTH_PENALTY)


def translate_file_marian_loop(model, tokenizer, texts: list[str], num_beams: int = 4) -> list[str]:
    """A plain loop over `MarianMTModel.generate`, one sentence at a time, in file order."""
    device = next(model.parameters()).device
    outputs = []
    with torch.no_grad():
        for text in texts:
            encoded = tokenizer(text, return_tensors="pt", return_token_type_ids=False).to(device)
            generated = model.generate(**encoded, num_beams=num_beams, length_penalty=LENGTH_PENALTY)
            outputs.append(tokenizer.decode(generated[0], skip_special_tokens=True).strip())
    return outputs


def translate_file_ctranslate2(translator, tokenizer, texts: list[str], start_token_id: int,
                               num_beams: int = 4) -> list[str]:
    """CTranslate2 on the whole file at once: `max_batch_size` as translate.py's batches, within which it sorts by
    length; the texts go through the same tokenizer, as subword tokens (with the source's end-of-sentence). Its
    hypotheses lack the decoder start token that `generate`'s outputs begin with: it is put back before decoding,
    where the benchmark's tokenizer keeps it as a word."""
    source = [tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids) for text in texts]
    results = translator.translate_batch(
        source, beam_size=num_beams, length_penalty=LENGTH_PENALTY, min_decoding_length=DECODE_NEW_TOKENS,
        max_decoding_length=DECODE_NEW_TOKENS, max_batch_size=TRANSLATE_BATCH_SIZE, return_scores=False,
    )
    return [tokenizer.decode([start_token_id, *tokenizer.convert_tokens_to_ids(result.hypotheses[0])],
                             skip_special_tokens=True).strip() for result in results]


# ----------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------


def memory_probe(implementation: str, preset: str, vocab_size: int, shape: tuple[int, int, int], device: str,
                 threads: int, seed: int = 0, steps: int = 2) -> dict:
    """Build one implementation's model and optimizer, run `steps` training steps, report the memory it took."""
    from transformers import MarianMTModel

    from . import Seq2SeqTransformerForConditionalGeneration

    torch.set_num_threads(threads)
    config = preset_config(preset, vocab_size)
    batch = to_device(train_batch(vocab_size, *shape, seed=seed), device)
    cuda = device.startswith("cuda")
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = current_rss_mb()
    torch.manual_seed(seed)
    if implementation == "ours":
        model = Seq2SeqTransformerForConditionalGeneration(config)
    else:
        model = MarianMTModel(marian_config_for(config))
    model = model.to(device).train()
    step = TRAIN_STEPS[implementation](model, device)
    for _ in range(steps):
        step(batch)
    synchronize(device)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)  # parameters() lists a tied one once
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        result = {"peak_allocated_mb": peak, "step_memory_mb": peak - base / 2**20}
        del model, step
        gc.collect()
        torch.cuda.empty_cache()
    else:
        peak = peak_rss_mb()
        result = {"peak_rss_mb": peak, "baseline_rss_mb": base, "step_memory_mb": peak - base}
    result["parameters"] = parameters
    # Weights + gradients + Adam's two moments, fp32: the floor any implementation pays.
    result["states_mb"] = parameters * 4 * 4 / 2**20
    return result


def _memory_probe_main() -> None:  # entry point of the subprocess started by `memory_in_subprocesses`
    arguments = json.loads(sys.argv[1])
    arguments["shape"] = tuple(arguments["shape"])
    print(json.dumps(memory_probe(**arguments)))


def subprocess_env() -> dict:
    """The environment of the benchmark's Python subprocesses: this checkout's package first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def memory_in_subprocesses(jobs: list[dict]) -> list[dict]:
    """Run `memory_probe(**job)` in fresh Python processes, started together, one per job."""
    code = "from modeling_seq2seq.benchmark import _memory_probe_main; _memory_probe_main()"
    running = [
        subprocess.Popen([sys.executable, "-c", code, json.dumps(job)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=subprocess_env())
        for job in jobs
    ]
    return [_probe_result(process) for process in running]


def _probe_result(process) -> dict:
    out, err = process.communicate()
    if process.returncode != 0:
        return {"error": (err or out).strip().splitlines()[-1] if (err or out).strip() else f"exit {process.returncode}"}
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    settings: BenchmarkSettings
    records: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    peak_flops: float | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    on_record: Callable[[], None] | None = None  # called after each measurement (writes the results so far)

    @contextlib.contextmanager
    def guard(self, what: str):
        """Run one measurement; if it raises, record the error (table, JSON, exit status) and go on with the next,
        so that one broken path does not cost the rest of a long run."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - recorded and reported, never hidden
            traceback.print_exc()
            self.failures.append(f"{what} failed: {type(error).__name__}: {error}".splitlines()[0])
            gc.collect()
            if self.settings.is_cuda:
                torch.cuda.empty_cache()

    def log(self, message: str) -> None:
        if self.settings.progress:
            print(f"[{time.perf_counter() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def take(self, record: dict) -> None:
        """A record made in another process: a matmul peak measured there divides the MFU of later presets too."""
        self.records.append(record)
        if record["phase"] == "matmul_peak":
            self.peak_flops = max(self.peak_flops or 0.0, record["flops_per_second"])
        if self.on_record is not None:
            self.on_record()

    def add(self, implementation: str, preset: str | None, phase: str, batch, seconds: list[float] | None,
            tokens: int | None, **extra) -> dict:
        record = {"implementation": implementation, "preset": preset, "phase": phase, "batch": batch}
        if seconds:
            record["median_seconds"] = median(seconds)
            record["min_seconds"] = min(seconds)  # less sensitive to other processes than the median
            record["tokens_per_second"] = tokens / record["median_seconds"] if tokens else None
            record["seconds"] = [round(s, 6) for s in seconds]
            record["repeats"] = len(seconds)
        else:
            record["median_seconds"] = None
            record["tokens_per_second"] = None
        record["tokens"] = tokens
        record["device"] = self.settings.device
        record["process"] = os.getpid()
        record.update(extra)
        self.records.append(record)
        if record["median_seconds"] is not None:
            self.log(f"  {implementation} {preset} {phase} {batch}: {record['median_seconds']:.4g} s"
                     + (f", {record['tokens_per_second']:,.0f} tok/s" if record["tokens_per_second"] else ""))
        if self.on_record is not None:
            self.on_record()
        return record


def ctranslate2_available() -> bool:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return False
    return True


# The process that runs CTranslate2 (`CTranslate2Process`): it imports ctranslate2 and nothing else. Replies are
# JSON lines on a duplicate of stdout; the C library's own prints go to stderr.
_CTRANSLATE2_PROCESS_CODE = """
import json, os, sys
replies = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
import ctranslate2
translator = None
for line in sys.stdin:
    message = json.loads(line)
    try:
        if translator is None:
            translator = ctranslate2.Translator(**message)
            reply = {"loaded": True}
        else:
            results = translator.translate_batch(message["source"], **message["options"])
            reply = {"hypotheses": [result.hypotheses for result in results]}
    except Exception as error:
        reply = {"error": f"{type(error).__name__}: {error}"}
    replies.write(json.dumps(reply) + "\\n")
    replies.flush()
"""


class CTranslate2Process:
    """A CTranslate2 `Translator` in a process of its own, driven over a pipe; `translate_batch` takes the same
    arguments and returns objects with `.hypotheses`.

    In a process that has imported torch, CTranslate2's OpenMP calls bind to torch's libgomp (torch puts it in the
    global symbol scope first), so CTranslate2's threads join torch's OpenMP runtime. With more OpenMP threads than
    CPUs, libgomp then stops spinning between parallel regions and wakes its threads through the kernel, for torch
    too: on 2 cores our greedy batch-1 step went from 10.4 to 16.9 ms once CTranslate2 had translated once in the
    process (~37 more context switches per step and thread), and every later torch measurement paid for it. Its own
    process gives CTranslate2 the runtime it has when used alone, and leaves ours alone. The pipe's round trip
    (~0.1 ms) is inside CTranslate2's timings."""

    def __init__(self, timeout: float = 600.0, **translator_arguments):
        self.timeout = timeout  # seconds one request may take before the process is taken for hung and killed
        # glibc keeps freed memory there too, as `keep_freed_memory` makes it in ours and Marian's processes (its
        # environment variables: mallopt does not reach another process).
        env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
        self.process = subprocess.Popen([sys.executable, "-c", _CTRANSLATE2_PROCESS_CODE], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        try:
            self._call(translator_arguments)
        except BaseException:
            self.close()
            raise

    def _call(self, message: dict) -> dict:
        if self.process.stdin.closed:
            raise RuntimeError("the CTranslate2 process is closed")
        line = ""
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
            if select.select([self.process.stdout], [], [], self.timeout)[0]:
                line = self.process.stdout.readline()
            else:
                self.close(kill=True)
                raise RuntimeError(f"the CTranslate2 process did not answer within {self.timeout:g} s; killed")
        except BrokenPipeError:
            pass
        if not line:
            self.close(kill=True)
            raise RuntimeError(f"the CTranslate2 process ended (exit status {self.process.returncode}); "
                               "its error is on stderr above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"CTranslate2: {reply['error']}")
        return reply

    def translate_batch(self, source: list[list[str]], **options):
        reply = self._call({"source": source, "options": options})
        return [types.SimpleNamespace(hypotheses=hypotheses) for hypotheses in reply["hypotheses"]]

    def close(self, kill: bool = False) -> None:
        """End the process (asked to by closing its input; killed if `kill` or after a minute) and reap it."""
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        if kill:
            self.process.kill()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()

    def __del__(self):
        if getattr(self, "process", None) is not None and self.process.returncode is None:
            self.close(kill=True)


def make_translator(marian, tokenizer, settings: BenchmarkSettings, folder: str) -> CTranslate2Process:
    from .export import convert_marian_to_ctranslate2

    convert_marian_to_ctranslate2(marian, tokenizer, folder, force=True)
    if settings.is_cuda:
        index = torch.device(settings.device).index or 0
        return CTranslate2Process(model_path=folder, device="cuda", device_index=index, compute_type="bfloat16")
    return CTranslate2Process(model_path=folder, device="cpu", compute_type="float32", intra_threads=settings.threads,
                              inter_threads=1)


def run_matmul(run: Run, preset: str | None = None) -> None:
    """Measure the matmul peak; the MFU divides by the highest measured so far in the run. With `preset`: again just
    before that preset's training, as the machine's speed drifts over a run (on a shared 2-core VM the peak moved
    from 200 to 218 GFLOP/s between runs): a peak measured in a slow phase must not inflate a later MFU."""
    settings = run.settings
    if settings.is_cuda:
        sizes, repeats = (4096, 8192), 10
    else:
        sizes, repeats = ((1024, 2048), 3) if settings.quick else ((1024, 2048, 3072), 3)
    run.log(f"matmul peak ({', '.join(map(str, sizes))})")
    peak = matmul_peak(settings.device, sizes, repeats)
    run.peak_flops = max(run.peak_flops or 0.0, peak["flops_per_second"])
    run.add("matmul", preset, "matmul_peak", None, None, None, flops_per_second=peak["flops_per_second"],
            per_size={str(k): v for k, v in peak["per_size"].items()}, dtype=peak["dtype"], best_of=repeats,
            per_kernel={kernel: {str(k): v for k, v in rates.items()} for kernel, rates in peak["per_kernel"].items()})


def decode_settings(settings: BenchmarkSettings, vocab: int):
    """(phase, num_beams, batch, input_ids, attention_mask, source lengths) of every decoding measurement."""
    for num_beams, phase in ((1, "decode_greedy"), (4, "decode_beam4"), (1, "decode_sample")):
        for batch in settings.decode_batches():
            input_ids, attention_mask, lengths = decode_inputs(vocab, batch, seed=settings.seed + batch)
            yield phase, num_beams, batch, input_ids, attention_mask, lengths


def float32_token_checks(run: Run, preset: str, ours, marian) -> dict:
    """Ours vs. Marian in float32 on the benchmark's device, for every decoding input (TF32 off).

    On a GPU the timed runs are bf16, where two correct implementations that add in different orders can pick
    different tokens once logits differ by a rounding step; float32 shows whether they compute the same function.
    """
    device = run.settings.device
    checks = {}
    with exact_float32():
        for phase, num_beams, batch, input_ids, attention_mask, _ in decode_settings(run.settings, ours.config.vocab_size):
            run.log(f"{preset} {phase} batch {batch}: float32 token check")
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            sample = phase == "decode_sample"
            checks[phase, batch] = compare_tokens(decode_marian(marian, input_ids, attention_mask, num_beams, sample),
                                                  decode_ours(ours, input_ids, attention_mask, num_beams, sample))
    return checks


@contextlib.contextmanager
def exact_float32():
    """TF32 off: float32 on a GPU is float32, as on a CPU. Through torch's newer setting: reading the legacy
    `allow_tf32` raises once anything has set the newer one (transformers' `enable_tf32` does)."""
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn)
    saved = [backend.fp32_precision for backend in backends]
    for backend in backends:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, precision in zip(backends, saved):
            backend.fp32_precision = precision


def run_decode(run: Run, preset: str, plan: dict, ours, marian, translator, tokenizer,
               float32_checks: dict | None = None) -> None:
    settings, device = run.settings, run.settings.device
    for phase, num_beams, batch, input_ids, attention_mask, lengths in decode_settings(settings, ours.config.vocab_size):
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        source_tokens = [tokenizer.convert_ids_to_tokens(row[:n]) for row, n in zip(input_ids.tolist(), lengths)]
        sample = phase == "decode_sample"
        calls = {
            "ours": lambda: decode_ours(ours, input_ids, attention_mask, num_beams, sample),
            "marian": lambda: decode_marian(marian, input_ids, attention_mask, num_beams, sample),
        }
        if translator is not None:
            calls["ctranslate2"] = lambda: decode_ctranslate2(translator, source_tokens, num_beams, tokenizer, sample)
        run.log(f"{preset} {phase} batch {batch}: token check")
        outputs = {name: call() for name, call in calls.items()}  # also the warm-up
        checks = {"marian": {"match": True, "reference": True}}
        checks["ours"] = compare_tokens(outputs["marian"], outputs["ours"])
        if "ctranslate2" in outputs and not sample:  # CTranslate2 samples with its own random generator
            checks["ctranslate2"] = compare_tokens(outputs["marian"], outputs["ctranslate2"])
        # In half precision the table gives the share that agrees; the float32 check must still be exact.
        exact = checks if settings.dtype == torch.float32 else {"ours": (float32_checks or {}).get((phase, batch))}
        for name, check in exact.items():
            if check is not None and not check["match"]:
                run.failures.append(f"{preset} {phase} batch {batch}: {name}'s tokens differ from Marian's in "
                                    f"{check['mismatched_tokens']}/{check['tokens']}; its speed is not comparable")
        run.log(f"{preset} {phase} batch {batch}: timing x{plan['decode']}")
        # On a GPU the products launched one by one time the launches, not the products (the step is recorded).
        products = None if settings.is_cuda else "ours: decoder matrix products"
        timed_calls = dict(calls)
        if products:
            timed_calls[products] = lambda: decoder_products_ours(ours, batch * num_beams)
        times = alternate(timed_calls, plan["decode"], device)
        tokens = batch * DECODE_NEW_TOKENS
        for name in calls:
            extra = {"decoder_products_seconds": median(times[products])} if name == "ours" and products else {}
            if name == "ours" and float32_checks:
                extra["float32_token_check"] = float32_checks[phase, batch]
            run.add(name, preset, phase, batch, times[name], tokens, num_beams=num_beams,
                    new_tokens=DECODE_NEW_TOKENS, source_lengths=lengths,
                    dtype=str(settings.dtype).replace("torch.", ""), token_check=checks.get(name), **extra)


def run_train(run: Run, preset: str, plan: dict, steps: dict, config) -> None:
    settings, device = run.settings, run.settings.device
    vocab = config.vocab_size
    for batch, source_length, target_length in settings.train_shapes():
        data = to_device(train_batch(vocab, batch, source_length, target_length, seed=settings.seed), device)
        run.log(f"{preset} train {batch}x{source_length}+{batch}x{target_length}: warm-up"
                + (" (the first compiles ours+compile)" if "ours+compile" in steps else ""))
        for name in list(steps):  # one that fails (a compiler error, say) costs its own rows only
            failures = len(run.failures)
            with run.guard(f"{preset} train, {name} warm-up"):
                for _ in range(2):
                    steps[name](data)
            if len(run.failures) > failures:
                del steps[name]
        run.log(f"{preset} train: timing x{plan['train']}")
        times = alternate({name: (lambda s=s: s(data)) for name, s in steps.items()}, plan["train"], device)
        flops = training_flops(config, batch, source_length, target_length)
        tokens = batch * (source_length + target_length)
        for name in steps:
            achieved = flops / median(times[name])
            run.add(name, preset, "train", batch, times[name], tokens, source_length=source_length,
                    target_length=target_length, dtype="bfloat16-autocast" if settings.is_cuda else "float32",
                    flops=flops, achieved_flops_per_second=achieved,
                    matmul_peak_flops_per_second=run.peak_flops,
                    mfu=achieved / run.peak_flops if run.peak_flops else None)


def run_forward(run: Run, preset: str, plan: dict, ours, marian) -> None:
    """One evaluation forward without gradients, ours against Marian, after a check that their logits agree."""
    settings, device = run.settings, run.settings.device
    models = {"ours": ours, "marian": marian}
    for batch, source_length, target_length in settings.train_shapes():
        data = to_device(train_batch(ours.config.vocab_size, batch, source_length, target_length,
                                     seed=settings.seed + 3), device)

        def forward(model):
            with torch.no_grad():
                return model(**data)

        run.log(f"{preset} forward {batch}x{source_length}+{batch}x{target_length}: logits check")
        logits = {name: forward(model).logits.float() for name, model in models.items()}  # also the warm-up
        difference = (logits["ours"] - logits["marian"]).abs().max().item()
        del logits
        if settings.dtype == torch.float32 and not difference <= 1e-3:
            run.failures.append(f"{preset} forward: ours' logits differ from Marian's by up to {difference:.3g}")
        run.log(f"{preset} forward: timing x{plan['forward']}")
        times = alternate({name: (lambda m=model: forward(m)) for name, model in models.items()}, plan["forward"],
                          device)
        for name in models:
            run.add(name, preset, "forward", batch, times[name], batch * (source_length + target_length),
                    source_length=source_length, target_length=target_length,
                    dtype=str(settings.dtype).replace("torch.", ""), logits_max_abs_diff=difference)


def run_length_mix(run: Run, preset: str, plan: dict, steps: dict, pad_token_id: int, vocab: int) -> None:
    from .data import Seq2SeqCollator, TokenBatchSampler

    settings, device = run.settings, run.settings.device
    count = plan["length_mix_sentences"]
    batch_size = PADDED_BATCH_SIZE * (4 if settings.is_cuda else 1)
    examples = mixed_length_examples(count, vocab, seed=settings.seed + 7)
    collator = Seq2SeqCollator(pad_token_id=pad_token_id)
    order = np.random.default_rng(settings.seed).permutation(count).tolist()
    padded_indices = [order[i : i + batch_size] for i in range(0, count, batch_size)]

    def padded_size(indices):
        return len(indices) * max(max(len(examples[i]["input_ids"]), len(examples[i]["labels"])) for i in indices)

    max_tokens = math.ceil(statistics.mean(padded_size(b) for b in padded_indices))
    sampler = TokenBatchSampler([len(e["input_ids"]) for e in examples], [len(e["labels"]) for e in examples],
                                max_tokens=max_tokens, shuffle=True, seed=settings.seed)
    token_indices = list(sampler)

    def collate(indices):
        return to_device(collator([examples[i] for i in indices]), device)

    loaders = {"token_batches": [collate(b) for b in token_indices], "padded": [collate(b) for b in padded_indices]}
    real_tokens = sum(len(e["input_ids"]) + len(e["labels"]) for e in examples)

    def slots(batches):
        return sum(b["input_ids"].numel() + b["labels"].numel() for b in batches)

    def epoch(step, batches):
        for b in batches:
            step(b)

    calls = {
        "ours+token_batches": lambda: epoch(steps["ours"], loaders["token_batches"]),
        "ours+padded": lambda: epoch(steps["ours"], loaders["padded"]),
        "marian+padded": lambda: epoch(steps["marian"], loaders["padded"]),
    }
    run.log(f"{preset} length mix: {count} sentences, {len(token_indices)} token batches (max_tokens {max_tokens}) "
            f"vs {len(padded_indices)} padded batches; warm-up")
    for name, loader in (("ours", "token_batches"), ("ours", "padded"), ("marian", "padded")):
        for b in loaders[loader][:2]:
            steps[name](b)
    run.log(f"{preset} length mix: timing x{plan['length_mix']}")
    times = alternate(calls, plan["length_mix"], device)
    for name in calls:
        loader = loaders["token_batches" if "token" in name else "padded"]
        run.add(name, preset, "train_length_mix", f"{count} sentences", times[name], real_tokens,
                sentences=count, batches=len(loader), padded_tokens=slots(loader),
                padding_fraction=1 - real_tokens / slots(loader), max_tokens=max_tokens if "token" in name else None,
                padded_batch_size=None if "token" in name else batch_size)


def run_translate_file(run: Run, preset: str, plan: dict, ours, marian, translator=None) -> None:
    from .export import synthetic_tokenizer, synthetic_token

    settings, device = run.settings, run.settings.device
    config = ours.config
    count = plan["file_sentences"]
    # "<s>" as an ordinary word, so that the decoded texts compared below keep it (untrained models emit it a lot).
    tokenizer = synthetic_tokenizer(config.vocab_size, config.pad_token_id, config.bos_token_id, config.eos_token_id,
                                    register_bos=False)
    source_lengths, _ = sentence_lengths(count, seed=settings.seed + 11)
    generator = torch.Generator().manual_seed(settings.seed + 11)
    texts = [" ".join(synthetic_token(i) for i in random_ids(generator, config.vocab_size, (n - 1,)).tolist())
             for n in source_lengths.tolist()]
    calls = {
        "ours": lambda: translate_file_ours(ours, tokenizer, texts),
        "marian": lambda: translate_file_marian_loop(marian, tokenizer, texts),
    }
    if translator is not None:
        calls["ctranslate2"] = lambda: translate_file_ctranslate2(translator, tokenizer, texts,
                                                                  config.decoder_start_token_id)
    # No separate warm-up: the decode phase has warmed both models up. The outputs of the first timed pass are
    # the ones compared.
    outputs: dict = {}
    with pinned_length([ours, marian], DECODE_NEW_TOKENS):
        repeats = {name: plan["file"] if name == "marian" else plan["file_fast"] for name in calls}
        run.log(f"{preset} translate file: {count} sentences, timing " + ", ".join(f"{k} x{v}" for k, v in repeats.items()))
        times = alternate(calls, repeats, device, first_outputs=outputs)
    tokens = count * DECODE_NEW_TOKENS
    methods = {
        "ours": f"training.translate_texts (scripts/translate.py), batch {TRANSLATE_BATCH_SIZE}, sorted by length",
        "marian": "MarianMTModel.generate, one sentence at a time, file order",
        "ctranslate2": f"Translator.translate_batch over the file, max_batch_size {TRANSLATE_BATCH_SIZE} (sorted by length)",
    }
    for name in calls:
        same = sum(a == b for a, b in zip(outputs[name], outputs["marian"]))
        check = {"match": same == count, "sentences": count, "same_sentences": same, "reference": name == "marian"}
        if same != count and settings.dtype == torch.float32:
            run.failures.append(f"{preset} translate file: {name}'s translations differ from Marian's in "
                                f"{count - same}/{count} sentences; its speed is not comparable")
        run.add(name, preset, "translate_file", f"{count} sentences", times[name], tokens, num_beams=4,
                new_tokens_per_sentence=DECODE_NEW_TOKENS, source_tokens=int(source_lengths.sum()),
                method=methods[name], output_check=check)


def run_memory(run: Run) -> None:
    settings = run.settings
    jobs = []
    for preset in settings.resolved_presets():
        for shape in settings.train_shapes()[:1]:
            for implementation in ("ours", "marian"):
                jobs.append(dict(implementation=implementation, preset=preset, vocab_size=VOCAB_SIZES.get(preset, 8000),
                                 shape=list(shape), device=settings.device, threads=1 if not settings.is_cuda else settings.threads,
                                 seed=settings.seed))
    run.log(f"peak memory of the training step: {len(jobs)} probes" + ("" if settings.is_cuda else " (fresh subprocesses)"))
    if settings.is_cuda:
        results = [memory_probe(**{**job, "shape": tuple(job["shape"])}) for job in jobs]
    else:
        # Started together (memory, not time, is measured): a probe per core at a time.
        results = []
        for start in range(0, len(jobs), max(1, settings.threads)):
            results += memory_in_subprocesses(jobs[start : start + max(1, settings.threads)])
    for job, result in zip(jobs, results):
        batch, source_length, target_length = job["shape"]
        run.add(job["implementation"], job["preset"], "train_memory", batch, None, None,
                source_length=source_length, target_length=target_length, **result)


def run_decoding_phases(run: Run, preset: str, phases: set[str]) -> None:
    """`forward`, `decode` and `translate_file` for one preset, on one pair of models in eval mode (and its
    CTranslate2 conversion)."""
    from .export import synthetic_tokenizer

    settings = run.settings
    plan = settings.plan(preset)
    use_ct2 = settings.use_ctranslate2 and ctranslate2_available()
    run.log(f"{preset}: building models")
    ours, marian = build_pair(preset, settings.seed, VOCAB_SIZES.get(preset))
    config = ours.config
    tokenizer = synthetic_tokenizer(config.vocab_size, config.pad_token_id, config.bos_token_id, config.eos_token_id)
    translator = None
    with tempfile.TemporaryDirectory(prefix="bench-ct2-") as workdir:
        if use_ct2 and phases & {"decode", "translate_file"}:
            run.log(f"{preset}: converting to CTranslate2")
            with run.guard(f"{preset}: CTranslate2 model on {settings.device}"):
                translator = make_translator(marian, tokenizer, settings, os.path.join(workdir, preset))
        ours.to(settings.device)
        marian.to(settings.device)
        float32_checks = None
        if "decode" in phases and settings.dtype != torch.float32:
            with run.guard(f"{preset} float32 token check"):
                float32_checks = float32_token_checks(run, preset, ours, marian)
        ours.to(settings.dtype)
        marian.to(settings.dtype)
        if "forward" in phases:
            with run.guard(f"{preset} forward"):
                run_forward(run, preset, plan, ours, marian)
        if "decode" in phases:
            with run.guard(f"{preset} decode"):
                run_decode(run, preset, plan, ours, marian, translator, tokenizer, float32_checks)
        if "translate_file" in phases:
            with run.guard(f"{preset} translate file"):
                run_translate_file(run, preset, plan, ours, marian, translator)
        if translator is not None:
            translator.close()


def run_training_phases(run: Run, preset: str, phases: set[str]) -> None:
    """`train` and `length_mix` for one preset, on one pair of models in train mode."""
    settings = run.settings
    plan = settings.plan(preset)
    run.log(f"{preset}: building training models")
    ours, marian = build_pair(preset, settings.seed + 1, VOCAB_SIZES.get(preset))
    ours.to(settings.device).train()
    marian.to(settings.device).train()
    steps = {"ours": ours_train_step(ours, settings.device), "marian": marian_train_step(marian, settings.device)}
    if settings.compiles and "train" in phases:  # compiled at its first warm-up, with dynamic shapes
        steps["ours+compile"] = ours_train_step(ours, settings.device, compile=True)
    if "train" in phases:
        with run.guard(f"{preset} matmul peak"):
            run_matmul(run, preset)
        with run.guard(f"{preset} train"):
            run_train(run, preset, plan, steps, ours.config)
    if "length_mix" in phases:
        with run.guard(f"{preset} length mix"):
            run_length_mix(run, preset, plan, steps, ours.config.pad_token_id, ours.config.vocab_size)


# A preset's phases in the order they run, each group on models of its own.
PHASE_GROUPS = (
    (run_decoding_phases, ("forward", "decode", "translate_file")),
    (run_training_phases, ("train", "length_mix")),
)


def set_up_process(settings: BenchmarkSettings) -> list[str]:
    """What every process of a run sets first; returns the notes it makes."""
    import transformers

    from .training import keep_freed_memory

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(settings.threads)
    if keep_freed_memory():
        return ["glibc keeps freed memory for reuse (training.keep_freed_memory, as our training loop sets it) for "
                "every column: it speeds up the Marian twin as much as ours."]
    return []


def _phase_group_main() -> None:  # entry point of the process started by `run_phase_group_in_a_process`
    channel = os.fdopen(os.dup(1), "w")  # the JSON lines; whatever else is printed goes to stderr
    os.dup2(2, 1)
    job = json.loads(sys.stdin.read())
    settings = BenchmarkSettings(**{**job["settings"], "presets": tuple(job["settings"]["presets"]),
                                    "phases": tuple(job["settings"]["phases"])})
    run = Run(settings, started=time.perf_counter() - job["elapsed"], peak_flops=job["peak_flops"])
    run.notes += set_up_process(settings)
    run.on_record = lambda: print(json.dumps({"record": run.records[-1]}), file=channel, flush=True)
    group = {function.__name__: function for function, _ in PHASE_GROUPS}[job["group"]]
    group(run, job["preset"], set(settings.phases))
    print(json.dumps({"notes": run.notes, "failures": run.failures}), file=channel, flush=True)


PHASE_GROUP_CODE = "from modeling_seq2seq.benchmark import _phase_group_main; _phase_group_main()"


def run_phase_group_in_a_process(run: Run, group, preset: str, phases: set[str]) -> None:
    """Run one preset's phase group in a fresh Python process, taking its records as they come (a JSON line each
    on its stdout), then its notes and failures."""
    settings = dataclasses.replace(run.settings, presets=(preset,), phases=tuple(sorted(phases)), isolate=False)
    job = {"settings": dataclasses.asdict(settings), "group": group.__name__, "preset": preset,
           "peak_flops": run.peak_flops, "elapsed": time.perf_counter() - run.started}
    process = subprocess.Popen([sys.executable, "-c", PHASE_GROUP_CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env=subprocess_env())
    ending, silent = None, threading.Event()

    def kill_when_silent() -> None:  # hung, or far slower than any run measured
        silent.set()
        process.kill()

    watchdog = None
    try:
        process.stdin.write(json.dumps(job))
        process.stdin.close()
        while True:
            watchdog = threading.Timer(settings.silence_timeout, kill_when_silent)
            watchdog.start()
            line = process.stdout.readline()
            watchdog.cancel()
            if not line:
                break
            message = json.loads(line)
            if "record" in message:
                run.take(message["record"])
            else:
                ending = message
        process.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if process.poll() is None:  # interrupted: the process goes with the run
            process.kill()
            process.wait()
        process.stdout.close()
    if silent.is_set():
        run.failures.append(f"{preset} {'/'.join(sorted(phases))} failed: its process sent no result for "
                            f"{settings.silence_timeout:g} s (BenchmarkSettings.silence_timeout) and was killed")
        return
    if process.returncode != 0 or ending is None:
        run.failures.append(f"{preset} {'/'.join(sorted(phases))} failed: its process ended with exit status "
                            f"{process.returncode} (its error is on stderr above)")
        return
    run.notes += [note for note in ending["notes"] if note not in run.notes]
    run.failures += ending["failures"]


def run_benchmark(settings: BenchmarkSettings, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Run every requested phase; returns {"machine": ..., "settings": ..., "records": [...]}. `on_progress` gets
    the results so far after each measurement (scripts/benchmark.py writes them, so a run cut short keeps them).
    With `settings.isolate`, each preset's decoding phases and its training phases run in a fresh process each."""
    run = Run(settings)
    run.notes += set_up_process(settings)
    machine = machine_info(settings)
    use_ct2 = settings.use_ctranslate2 and ctranslate2_available()
    if settings.use_ctranslate2 and not use_ct2:
        run.notes.append("ctranslate2 is not installed: no CTranslate2 column.")
    if settings.isolate:
        run.notes.append("Each preset's decoding phases and its training phases ran in a fresh process each.")

    def results(complete: bool) -> dict:
        machine["load_average_end"] = list(os.getloadavg())
        machine["wall_seconds"] = round(time.perf_counter() - run.started, 1)
        settings_dict = dataclasses.asdict(settings)
        settings_dict["presets"] = list(settings.resolved_presets())
        settings_dict["ctranslate2"] = use_ct2
        return {"machine": machine, "settings": settings_dict, "records": list(run.records), "notes": run.notes,
                "failures": run.failures, "complete": complete}

    if on_progress is not None:
        run.on_record = lambda: on_progress(results(complete=False))
    phases = set(settings.phases)
    unknown = phases - set(PHASES)
    if unknown:
        raise ValueError(f"unknown phase(s) {sorted(unknown)}; known: {', '.join(PHASES)}")
    if "matmul" in phases or "train" in phases:
        with run.guard("matmul peak"):
            run_matmul(run)
    if "memory" in phases:
        with run.guard("train step memory"):
            run_memory(run)  # first: no model of this process is alive yet (GPU), nothing else is timed (CPU)
    for preset in settings.resolved_presets():
        for group, names in PHASE_GROUPS:
            wanted = phases & set(names)
            if not wanted:
                continue
            if settings.isolate:
                run_phase_group_in_a_process(run, group, preset, wanted)
                continue
            group(run, preset, wanted)
            gc.collect()
            if settings.is_cuda:
                torch.cuda.empty_cache()
    return results(complete=True)


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------


def _rate(record: dict | None) -> str:
    if not record or not record.get("tokens_per_second"):
        return "-"
    return f"{record['tokens_per_second']:,.0f} tok/s ({record['median_seconds']:.3g} s)"


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or not a.get("tokens_per_second") or not b.get("tokens_per_second"):
        return "-"
    return f"{a['tokens_per_second'] / b['tokens_per_second']:.2f}x"


def _check_text(ours: dict | None, ct2: dict | None) -> str:
    parts = []
    exact = (ours or {}).get("float32_token_check")
    if exact:
        parts.append("float32: ours=Marian exact" if exact["match"] else
                     f"MISMATCH in float32, ours vs Marian: {exact['mismatched_sequences']}/{exact['sequences']} seqs, "
                     f"{exact['mismatched_tokens']}/{exact['tokens']} tok")
    check = (ours or {}).get("token_check")
    if check and exact:  # timed in half precision: rounding may flip near-ties, so report the agreement
        dtype = ours.get("dtype", "half precision")
        parts.append(f"{dtype}: ours=Marian exact" if check["match"] else
                     f"{dtype}: {check['tokens'] - check['mismatched_tokens']}/{check['tokens']} tok agree "
                     f"({check['sequences'] - check['mismatched_sequences']}/{check['sequences']} seqs identical)")
    elif check:
        parts.append("ours=Marian exact" if check["match"] else
                     f"MISMATCH ours vs Marian: {check['mismatched_sequences']}/{check['sequences']} seqs, "
                     f"{check['mismatched_tokens']}/{check['tokens']} tok")
    check = (ct2 or {}).get("token_check")
    if check:
        parts.append("CT2=Marian exact" if check["match"] else
                     f"CT2 vs Marian: {check['mismatched_tokens']}/{check['tokens']} tok differ "
                     f"({check['mismatched_sequences']}/{check['sequences']} seqs)")
    return "; ".join(parts)


def result_rows(result: dict) -> list[list[str]]:
    """The table as rows of cells (the header first)."""
    records = result["records"]
    header = ["phase", "preset", "shape", "ours", "Marian", "CT2", "ours/Marian", "ours/CT2", "notes"]
    rows = [header]
    by_key: dict[tuple, dict[str, dict]] = {}
    order: list[tuple] = []
    for r in records:
        shape = r.get("batch")
        key = (r["phase"], r["preset"], str(shape), r.get("source_length"))
        if key not in by_key:
            by_key[key] = {}
            order.append(key)
        by_key[key][r["implementation"]] = r
    for key in order:
        phase, preset, _, _ = key
        group = by_key[key]
        if phase == "matmul_peak":
            r = group["matmul"]
            sizes = "; ".join(kernel + " " + ", ".join(f"{n}^2 {v / 1e9:.0f}" for n, v in rates.items())
                              for kernel, rates in r["per_kernel"].items())
            again = "; again before this preset's training (the MFU divides by the highest so far)" if preset else ""
            rows.append(["matmul peak (" + r["dtype"] + ")", preset or "-", "square n x n",
                         f"{r['flops_per_second'] / 1e9:,.1f} GFLOP/s", "", "", "", "",
                         f"best of {r['best_of']} per size and kernel{again}; GFLOP/s: {sizes}"])
        elif phase == "train":
            ours, marian = group.get("ours"), group.get("marian")
            r = ours or marian
            shape = f"{r['batch']}x{r['source_length']} + {r['batch']}x{r['target_length']} tok"
            note = ""
            if ours and marian and ours.get("mfu") is not None:
                note = f"MFU ours {ours['mfu']:.0%}, Marian {marian['mfu']:.0%} ({ours['flops'] / 1e9:.1f} GFLOP/step)"
            rows.append([f"train fwd+bwd+Adam ({r['dtype']})", preset, shape, _rate(ours), _rate(marian), "-",
                         _ratio(ours, marian), "-", note])
            compiled = group.get("ours+compile")
            if compiled:
                note = f"ours: torch.compile (training option `compile: true`), Marian eager; MFU {compiled['mfu']:.0%}" \
                    if compiled.get("mfu") is not None else "ours: torch.compile, Marian eager"
                rows.append(["  same, ours compiled", preset, shape, _rate(compiled), _rate(marian), "-",
                             _ratio(compiled, marian), "-", note])
        elif phase == "forward":
            ours, marian = group.get("ours"), group.get("marian")
            r = ours or marian
            rows.append([f"forward, no grad ({r['dtype']})", preset,
                         f"{r['batch']}x{r['source_length']} + {r['batch']}x{r['target_length']} tok", _rate(ours),
                         _rate(marian), "-", _ratio(ours, marian), "-",
                         f"eval mode, logits + loss; logits max |ours - Marian| {r['logits_max_abs_diff']:.1e}"])
        elif phase == "train_memory":
            ours, marian = group.get("ours"), group.get("marian")

            def mem(r):
                if not r or "step_memory_mb" not in r:
                    return (r or {}).get("error", "-")
                total = r.get("peak_rss_mb", r.get("peak_allocated_mb"))
                return f"{r['step_memory_mb']:,.0f} MB (peak {total:,.0f})"

            ratio = "-"
            if ours and marian and ours.get("step_memory_mb") and marian.get("step_memory_mb"):
                ratio = f"{ours['step_memory_mb'] / marian['step_memory_mb']:.2f}x mem"
            r = ours or marian
            note = "lower is better; weights+grads+Adam alone: " + (f"{r['states_mb']:,.0f} MB" if r and "states_mb" in r else "-")
            rows.append(["train step memory", preset, f"{r['batch']}x{r['source_length']} + {r['batch']}x{r['target_length']} tok",
                         mem(ours), mem(marian), "-", ratio, "-", note])
        elif phase == "train_length_mix":
            token, padded, marian = group.get("ours+token_batches"), group.get("ours+padded"), group.get("marian+padded")
            r = token or padded
            note = "non-padding tok/s; ours column: TokenBatchSampler, Marian column: padded batches of 16 in random order"
            if token and padded:
                note += (f"; ours with padded batches {_rate(padded)}: token batching gains {_ratio(token, padded)}; "
                         f"padding {padded['padding_fraction']:.0%} -> {token['padding_fraction']:.0%}")
            rows.append(["train, length mix", preset, f"{r['sentences']} sentences, 5..120 tok", _rate(token), _rate(marian), "-",
                         _ratio(token, marian), "-", note])
        elif phase in ("decode_greedy", "decode_beam4", "decode_sample"):
            ours, marian, ct2 = group.get("ours"), group.get("marian"), group.get("ctranslate2")
            r = ours or marian
            note = _check_text(ours, ct2)
            if phase == "decode_sample" and ct2:
                note += "; CT2 draws with its own random generator (no token check)"
            if ours and ours.get("median_seconds"):
                note += f"; ours per step {ours['median_seconds'] / DECODE_NEW_TOKENS * 1e3:.1f} ms"
            if ours and ours.get("decoder_products_seconds"):
                note += f"; the step's float32 matrix products alone {ours['decoder_products_seconds'] / DECODE_NEW_TOKENS * 1e3:.1f} ms"
            rows.append([phase.replace("_", " "), preset, f"batch {r['batch']} x {DECODE_NEW_TOKENS} new tok", _rate(ours),
                         _rate(marian), _rate(ct2), _ratio(ours, marian), _ratio(ours, ct2), note])
        elif phase == "translate_file":
            ours, marian, ct2 = group.get("ours"), group.get("marian"), group.get("ctranslate2")
            check = (ours or marian)["output_check"]
            same = "; ".join(f"{label} = Marian in {r['output_check']['same_sentences']}/{check['sentences']} sentences"
                             for label, r in (("ours", ours), ("CT2", ct2)) if r)
            note = (f"{same}; ours: translate.py path (sorted, batch {TRANSLATE_BATCH_SIZE}); Marian: generate per "
                    f"sentence in file order" + (f"; CT2: translate_batch, max_batch_size {TRANSLATE_BATCH_SIZE}" if ct2 else ""))
            rows.append(["translate file, beam 4", preset, f"{check['sentences']} sentences x {DECODE_NEW_TOKENS} tok",
                         _rate(ours), _rate(marian), _rate(ct2), _ratio(ours, marian), _ratio(ours, ct2), note])
    return rows


def format_table(result: dict) -> str:
    rows = result_rows(result)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths)] + [row[-1]]
        lines.append(" | ".join(cells).rstrip())
        if index == 0:
            lines.append("-|-".join("-" * w for w in widths) + "-|-" + "-" * 5)
    machine = result["machine"]
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_start"])
    footer = [
        "",
        f"Machine: {machine['cpu_model']} ({machine['cpu_count']} CPUs), {machine['threads']} threads, device "
        f"{machine['device']}" + (f" ({machine['gpu']})" if machine.get("gpu") else "")
        + f"; torch {machine['torch_version']}, transformers {machine['transformers_version']}, ctranslate2 "
        f"{machine['ctranslate2_version'] or 'not installed'}.",
        f"Load average at start: {load}" + (f"; at end: {', '.join(f'{x:.2f}' for x in machine['load_average_end'])}"
                                             if "load_average_end" in machine else "")
        + f"; wall time {machine.get('wall_seconds', '?')} s. Medians over repeats, implementations alternated; "
        "tok/s: train = source + target tokens, decode/translate = generated tokens.",
    ]
    # Busy: fewer idle CPUs than the run's threads (on 2 CPUs, a load above 2, as the run's own threads count there).
    if machine["load_average_start"][0] > max(machine["threads"], machine["cpu_count"] - machine["threads"]):
        footer.append("Warning: the machine was busy when the run started (fewer idle CPUs than the run's threads): "
                      "timings are noisy.")
    footer += result.get("notes", [])
    footer += [f"FAILED: {failure}" for failure in result.get("failures", [])]
    return "\n".join(lines + footer)


def write_json(result: dict, path: str | os.PathLike) -> None:
    from .checkpointing import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")


__all__ = ["BenchmarkSettings", "run_benchmark", "format_table", "write_json", "training_flops", "compare_tokens"]
