"""The CUDA paths, against independent references: Marian on the same GPU, transformers' own `generate`, eager
attention in float32, a float64 loss. Skipped without CUDA; the GPU machine runs them (README, "On a GPU").

tests/test_reliability.py has the autocast/half-precision finiteness test; tests/test_transformers_common.py runs
transformers' common tests on the GPU when there is one (its `torch_device`).
"""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationMixin

from modeling_seq2seq import Seq2SeqTransformerForConditionalGeneration
from modeling_seq2seq.convert import to_marian
from modeling_seq2seq.decoding_seq2seq import StaticIncrementalDecoder
from modeling_seq2seq.modeling_seq2seq import LabelSmoothedCrossEntropy
from modeling_seq2seq.presets import load_preset
from test_model import VOCAB, assert_fast_generate_equals_transformers_generate, make_model, padded_batch, static_generate
from test_training import assets, read_log, run_args  # noqa: F401 - `assets` is the training tests' fixture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """TF32 off: float32 on the GPU is then float32, as on the CPU."""
    from modeling_seq2seq.benchmark import exact_float32

    with exact_float32():
        yield


def cuda_batch(**kwargs):
    return tuple(t.cuda() for t in padded_batch(**kwargs))


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_logits_and_generation_match_marian_on_the_gpu(preset):
    torch.manual_seed(0)
    vocab = 300 if preset == "tiny" else 1000
    ours = Seq2SeqTransformerForConditionalGeneration(load_preset(preset, vocab_size=vocab, dropout=0.0)).eval()
    marian = to_marian(ours).eval().cuda()
    ours.cuda()
    source, mask = cuda_batch(seed=1, batch=4, length=13, vocab=vocab)
    target, _ = cuda_batch(seed=2, batch=4, length=9, vocab=vocab)
    with torch.no_grad():
        logits = ours(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
        reference = marian(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
    assert logits.is_cuda
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-4)
    for settings in (dict(num_beams=1), dict(num_beams=4, length_penalty=0.6)):
        settings.update(max_new_tokens=16, do_sample=False)
        assert torch.equal(ours.generate(source, attention_mask=mask, **settings),
                           marian.generate(source, attention_mask=mask, **settings)), settings


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16", "autocast-bfloat16"])
def test_fast_generate_on_the_gpu_equals_transformers_generate(precision):
    """Each link checked exactly: the recorded step replays the static decoder's arithmetic bit for bit; the static
    decoder (fixed-size masked cache) equals transformers in float32; the step-by-step decoder (what autocast and
    hooks use) equals transformers in every precision. In half precision the static decoder's masked attention may
    round differently from an unmasked one, so its tokens are not compared with transformers' there."""
    model = make_model().cuda()
    autocast = precision.startswith("autocast")
    if not autocast:
        model = model.to(getattr(torch, precision))
    source, mask = cuda_batch()
    recorded = []
    record = StaticIncrementalDecoder.record
    with pytest.MonkeyPatch.context() as patch, torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        patch.setattr(StaticIncrementalDecoder, "record", lambda self: (recorded.append(self), record(self))[1])
        for num_beams in (1, 3):
            settings = dict(num_beams=num_beams, max_new_tokens=6)
            replayed = model.generate(source, attention_mask=mask, **settings)
            if not autocast:
                # A capture that fails falls back to the unrecorded step with a warning: the comparison below would
                # then compare the static decoder with itself.
                assert recorded and recorded[-1].graph is not None, (precision, settings)
                assert torch.equal(replayed, static_generate(model, source, mask, **settings)), settings
            else:
                assert not recorded, "autocast runs step by step"
            if precision == "float32":
                assert torch.equal(replayed, GenerationMixin.generate(model, source, attention_mask=mask, **settings))
        model.decode_with_cuda_graphs = False
        assert_fast_generate_equals_transformers_generate(model, source, mask)


@pytest.mark.parametrize("seed", range(3))
def test_fast_generate_search_rules_on_the_gpu(seed):
    """test_model's search cases (sentences ending at different steps, banned and forced tokens) on the GPU."""
    model = make_model(seed).cuda()
    with torch.no_grad():
        model.model.shared.weight[2] += 0.3 * (seed + 1)
    source, mask = cuda_batch(seed=seed, batch=2 + seed, length=6 + seed)
    for settings in (dict(num_beams=1), dict(num_beams=4, length_penalty=0.6),
                     dict(num_beams=3, num_return_sequences=2), dict(num_beams=2, bad_words_ids=[[5]], forced_eos_token_id=2)):
        settings["max_new_tokens"] = 8
        ours = model.generate(source, attention_mask=mask, **settings)
        assert ours.is_cuda
        assert torch.equal(ours, GenerationMixin.generate(model, source, attention_mask=mask, **settings)), settings


@pytest.mark.parametrize("dtype", HALF)
def test_unpadded_batches_run_every_attention_on_the_flash_kernel(dtype):
    """Without padding the model passes no mask (SDPA's causal flag in the decoder), so FlashAttention can run
    every attention call: forcing the flash kernel must work, and give eager float32's result."""
    model = make_model().cuda().eval()
    source = torch.randint(4, VOCAB, (3, 12), device="cuda")
    target = torch.randint(4, VOCAB, (3, 7), device="cuda")
    with torch.no_grad():
        model.config._attn_implementation = "eager"
        reference = model(input_ids=source, decoder_input_ids=target).logits
        model.config._attn_implementation = "sdpa"
        half = model.to(dtype)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            logits = half(input_ids=source, decoder_input_ids=target).logits
    torch.testing.assert_close(logits.float(), reference, rtol=0, atol=0.05 * reference.abs().max().item())


@pytest.mark.parametrize("backend", [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_padded_batches_on_each_sdpa_kernel_equal_eager_attention(backend, dtype):
    """Padding masks go to the kernels that take a mask; a fully padded source row stays finite."""
    model = make_model().cuda().eval()
    source, mask = cuda_batch()
    mask[2] = 0
    inputs = dict(input_ids=source, attention_mask=mask, decoder_input_ids=source[:, :6])
    with torch.no_grad():
        model.config._attn_implementation = "eager"
        reference = model(**inputs).logits
        model.config._attn_implementation = "sdpa"
        model.to(dtype)
        with sdpa_kernel(backend):
            logits = model(**inputs).logits.float()
    assert torch.isfinite(logits).all()
    tolerance = 1e-4 if dtype == torch.float32 else 0.05 * reference[:2].abs().max().item()
    torch.testing.assert_close(logits[[0, 1, 3]], reference[[0, 1, 3]], rtol=0, atol=tolerance)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_label_smoothed_loss_on_bf16_logits_equals_a_float64_recomputation(epsilon):
    torch.manual_seed(0)
    logits = (3 * torch.randn(40, 1000, device="cuda")).bfloat16().float().requires_grad_()
    labels = torch.randint(0, 1000, (40,), device="cuda")
    labels[::7] = -100
    loss = LabelSmoothedCrossEntropy.apply(logits, labels, epsilon)
    loss.backward()
    reference_logits = logits.detach().double().requires_grad_()
    reference = torch.nn.functional.cross_entropy(reference_logits, labels, label_smoothing=epsilon)
    reference.backward()
    assert math.isclose(loss.item(), reference.item(), rel_tol=1e-5)
    torch.testing.assert_close(logits.grad.double(), reference_logits.grad, rtol=1e-4, atol=1e-7)


def test_bf16_autocast_training_step_follows_float32():
    """One bf16-autocast training step moves the weights like a float32 step (fused Adam on the GPU)."""
    from modeling_seq2seq.training import TrainingConfig, compute_loss, make_optimizer_and_scheduler

    source, mask = cuda_batch(batch=6, length=10)
    batch = dict(input_ids=source, attention_mask=mask, labels=source[:, :8])
    updated = {}
    for autocast in (False, True):
        model = make_model(dropout=0.0).cuda().train()
        optimizer, scheduler = make_optimizer_and_scheduler(model, TrainingConfig(), model.config.d_model)
        assert optimizer.defaults.get("fused"), "fused Adam on CUDA"
        before = model.model.shared.weight.detach().clone()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        scheduler.step()
        assert model.model.shared.weight.dtype == torch.float32
        updated[autocast] = model.model.shared.weight.detach() - before
    assert updated[False].abs().max() > 0
    cosine = torch.nn.functional.cosine_similarity(updated[False].flatten(), updated[True].flatten(), dim=0)
    assert cosine > 0.95


def test_compiled_bf16_training_step_is_as_close_to_float32_as_the_eager_one():
    """`compile: true` on the GPU (Triton kernels fuse the casts, dropout, residuals, layer norms and the loss):
    under bf16 autocast its loss and gradients are as close to the float32 step's as the eager bf16 step's are."""
    from modeling_seq2seq.training import compiled_for_training, compute_loss

    source, mask = cuda_batch(batch=6, length=10)
    batch = dict(input_ids=source, attention_mask=mask, labels=source[:, :8])
    model = make_model(dropout=0.0).cuda().train()
    compiled = compiled_for_training(model)
    results = {}
    for name, step_model, bf16 in (("float32", model, False), ("eager", model, True), ("compiled", compiled, True)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = compute_loss(step_model, batch)
        loss.backward()
        results[name] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    reference_loss, reference_grad = results["float32"]

    def error(name):
        loss, grad = results[name]
        return abs(loss - reference_loss), ((grad - reference_grad).norm() / reference_grad.norm()).item()

    (eager_loss_error, eager_grad_error), (loss_error, grad_error) = error("eager"), error("compiled")
    assert 0 < eager_grad_error < 0.05
    assert loss_error <= 2 * eager_loss_error + 1e-3 and grad_error <= 2 * eager_grad_error, (error("eager"), error("compiled"))


def test_compiled_step_compiles_once_on_each_side_of_inductors_fusion_threshold():
    """The GPU benchmark's training shapes (up to the paper's 25k-token batch, a 37k vocabulary) and one more large
    shape run on two compiled graphs: one below and one above Inductor's mix-order-reduction threshold (a fusion
    heuristic of its GPU backend, for reductions such as the layer-norm backward, that guards on d_model x tokens
    >= 5 * 2^20; in the benchmark it recompiled base at 200x128 tokens). Any other recompilation fails the test."""
    from torch._dynamo.utils import counters

    from modeling_seq2seq.benchmark import train_batch
    from modeling_seq2seq.training import compiled_for_training, compute_loss

    d_model, vocab = 256, 37000
    model = make_model(dropout=0.0, vocab_size=vocab, d_model=d_model, encoder_ffn_dim=1024,
                       decoder_ffn_dim=1024).cuda().train()
    compiled = compiled_for_training(model)
    threshold_tokens = 5 * 2**20 // d_model
    counters.clear()
    crossed = False
    for index, (rows, source_length, target_length) in enumerate(
            ((16, 32, 32), (128, 64, 64), (200, 128, 128), (176, 120, 136))):
        above = rows * min(source_length, target_length) >= threshold_tokens
        compiles = index == 0 or (above and not crossed)
        crossed |= above
        batch = {k: v.cuda() for k, v in train_batch(vocab, rows, source_length, target_length, seed=index).items()}
        with torch._dynamo.config.patch(error_on_recompile=not compiles), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compute_loss(compiled, batch)
        loss.backward()
        assert torch.isfinite(loss)
        model.zero_grad(set_to_none=True)
    assert crossed
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters)


def test_recorded_decode_step_is_recorded_again_as_the_cache_grows():
    """Sentences longer than the cache (64 positions at first) grow it to 128 and then 160 positions; each growth
    records the step again, and the tokens stay transformers' (float32)."""
    model = make_model().cuda()
    source, mask = cuda_batch()
    recorded = []
    record = StaticIncrementalDecoder.record
    for num_beams in (1, 4):
        settings = dict(num_beams=num_beams, min_new_tokens=150, max_new_tokens=150)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(StaticIncrementalDecoder, "record", lambda self: recorded.append(self.capacity) or record(self))
            ids = model.generate(source, attention_mask=mask, **settings)
        assert recorded == [64, 128, 160], recorded
        assert ids.shape[1] == 151
        assert torch.equal(ids, GenerationMixin.generate(model, source, attention_mask=mask, **settings))
        recorded.clear()


def test_gradient_checkpointing_on_the_gpu_gives_the_same_gradients():
    source, mask = cuda_batch()
    grads = []
    for checkpointing in (False, True):
        model = make_model(dropout=0.0).cuda().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=source, attention_mask=mask, labels=source[:, :5]).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)


def test_training_loop_runs_on_the_gpu_in_bf16_and_resumes(assets, tmp_path, capsys):
    """scripts/train.py's loop on one GPU (Accelerate picks it), bf16 mixed precision, then stop and resume."""
    from modeling_seq2seq import training

    out = tmp_path / "run"
    assert training.main(run_args(assets, out, max_steps=8, mixed_precision="bf16")) == 0
    printed = capsys.readouterr().out
    assert "cuda" in printed, printed[-2000:]
    losses = [r["loss"] for r in read_log(out) if r["type"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert training.main(run_args(assets, out, max_steps=12, mixed_precision="bf16", resume_from_checkpoint="latest")) == 0
    assert (out / "checkpoint-12").is_dir()
    model, tokenizer = training.load_model_and_tokenizer(out)
    assert next(model.parameters()).is_cuda
    assert len(training.translate_texts(model, tokenizer, ["seven", "forty-two"], num_beams=4)) == 2


def test_generate_replays_a_recorded_step_and_runs_modules_where_it_must(monkeypatch):
    """On a GPU greedy/beam `generate` records one decode step as a CUDA graph per call; hooks, autocast and the
    opt-out run the modules step by step instead. Every path gives transformers' tokens."""
    model = make_model().cuda()
    source, mask = cuda_batch()
    recorded = []
    record = StaticIncrementalDecoder.record
    monkeypatch.setattr(StaticIncrementalDecoder, "record", lambda self: recorded.append(self) or record(self))
    settings = dict(num_beams=4, max_new_tokens=9)
    expected = GenerationMixin.generate(model, source, attention_mask=mask, **settings)
    assert torch.equal(model.generate(source, attention_mask=mask, **settings), expected)
    assert len(recorded) == 1 and recorded[0].graph is not None

    calls = []
    handle = model.model.decoder.layers[0].feed_forward.register_forward_hook(lambda *args: calls.append(1))
    assert torch.equal(model.generate(source, attention_mask=mask, **settings), expected)
    handle.remove()
    assert len(recorded) == 1 and len(calls) > 1, "a hooked module runs at every step"

    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.generate(source, attention_mask=mask, **settings)
    model.decode_with_cuda_graphs = False
    assert torch.equal(model.generate(source, attention_mask=mask, **settings), expected)
    assert len(recorded) == 1

    with torch.no_grad():  # the next call records again, with the edited weights
        model.lm_head.weight.mul_(-1)
    model.decode_with_cuda_graphs = True
    edited = model.generate(source, attention_mask=mask, **settings)
    assert len(recorded) == 2 and not torch.equal(edited, expected)
    assert torch.equal(edited, GenerationMixin.generate(model, source, attention_mask=mask, **settings))


def test_training_loop_in_fp16_survives_a_non_finite_loss(assets, tmp_path, monkeypatch):
    """`mixed_precision: fp16` (the GradScaler path, for cards without bf16): a step whose loss is not finite is
    skipped, and the next steps train (the scaler must not be left between unscale_ and update)."""
    from modeling_seq2seq import training

    real, calls = training.compute_loss, []

    def compute_loss(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(training, "compute_loss", compute_loss)
    out = tmp_path / "fp16"
    assert training.main(run_args(assets, out, max_steps=6, mixed_precision="fp16")) == 0
    records = read_log(out)
    assert [r["type"] for r in records if r["type"] == "skipped"] == ["skipped"]
    assert any(r["type"] == "train" and r["step"] == 6 for r in records)
