"""The core model: parity with transformers' MarianMTModel, the paper's properties, and transformers plumbing."""

import collections
import contextlib
import copy
import gc
import itertools
import json
import math
import pickle
import shutil
import threading
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, GenerationConfig, GenerationMixin
from transformers.cache_utils import EncoderDecoderCache, StaticCache

from modeling_seq2seq import (
    Seq2SeqTransformerConfig,
    Seq2SeqTransformerForConditionalGeneration,
    Seq2SeqTransformerModel,
)
from modeling_seq2seq import decoding_seq2seq, modeling_seq2seq
from modeling_seq2seq.convert import from_marian, to_marian
from modeling_seq2seq.decoding_seq2seq import (
    DecodeStepLinear,
    GreedyScreen,
    IncrementalDecoder,
    StaticIncrementalDecoder,
    beam_search,
    greedy_search,
    scripted_decode_step,
    suppress_tokens,
)
from modeling_seq2seq.modeling_seq2seq import (
    CACHE_FIELD,
    LabelSmoothedCrossEntropy,
    SinusoidalPositionalEncoding,
    add_dropout,
    apply_dropout,
    attention_dtype,
    computes_in_float32,
    dropout_mask,
    linear,
    lowbias32_,
    matmul_under_bf16_precision,
    onednn_linear_kernel,
    onednn_matmul,
    onednn_matmul_keeps_float32,
    padding_mask,
    search_linear,
    tied_gradient,
)
from modeling_seq2seq.presets import load_preset
from modeling_seq2seq.tokenization import load_tokenizer, save_tokenizer, train_tokenizer

VOCAB = 64


def tiny_config(**overrides):
    fields = dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    )
    return Seq2SeqTransformerConfig(**{**fields, **overrides})


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Seq2SeqTransformerForConditionalGeneration(tiny_config(**overrides)).eval()


def padded_batch(seed=0, batch=4, length=11, vocab=VOCAB):
    """Random source ids (no special tokens) with right padding of different lengths, eos at each end."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=generator)
    lengths = [length - 3 * (i % 3) for i in range(batch)]
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n - 1] = 2
        ids[i, n:] = 0
    return ids, mask


# --- Parity with an independent reference ------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", pytest.param("base", marks=pytest.mark.slow)])
def test_logits_and_generation_match_marian(preset):
    """Our hand-written model and transformers' MarianMTModel with the same weights compute the same function."""
    torch.manual_seed(0)
    vocab = 300 if preset == "tiny" else 1000
    config = load_preset(preset, vocab_size=vocab, dropout=0.0)
    ours = Seq2SeqTransformerForConditionalGeneration(config).eval()
    marian = to_marian(ours).eval()
    source, mask = padded_batch(seed=1, batch=4, length=13, vocab=vocab)
    target, _ = padded_batch(seed=2, batch=4, length=9, vocab=vocab)
    with torch.no_grad():
        logits = ours(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
        reference = marian(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
    assert (logits - reference).abs().max().item() < 1e-4
    for settings in (dict(num_beams=1), dict(num_beams=4, length_penalty=0.6)):
        settings.update(max_new_tokens=16, do_sample=False)
        assert torch.equal(
            ours.generate(source, attention_mask=mask, **settings),
            marian.generate(source, attention_mask=mask, **settings),
        ), settings


def test_dummy_inputs_run_as_marians_do():
    """`model(**model.dummy_inputs)` runs (it raised: the dummy batch had no decoder input) and gives Marian's logits."""
    ours = make_model()
    marian = to_marian(ours).eval()
    assert ours.dummy_inputs.keys() == marian.dummy_inputs.keys()
    assert all(torch.equal(ours.dummy_inputs[key], marian.dummy_inputs[key]) for key in ours.dummy_inputs)
    with torch.no_grad():
        assert torch.allclose(ours(**ours.dummy_inputs).logits, marian(**marian.dummy_inputs).logits, atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_float64_model_computes_in_float64_as_marian_does(implementation):
    """In float64 the two compute the same function to float64 rounding, through each attention and the loss; the
    twin carries float64 weights exactly (weights off the float32 grid, so that rounding through float32 shows), and
    `from_marian` carries them back exactly."""
    ours = make_model().double()
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-3)
    ours.set_attn_implementation(implementation)
    marian = to_marian(ours).eval()
    marian.set_attn_implementation(implementation)
    assert all(p.dtype == torch.float64 for p in marian.parameters())
    assert torch.equal(marian.model.shared.weight, ours.model.shared.weight)
    back = from_marian(marian)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())
    source, mask = padded_batch()
    eager = implementation == "eager"  # the weights come from eager attention only
    inputs = dict(input_ids=source, attention_mask=mask, labels=source[:, :7].contiguous(), output_attentions=eager)
    with torch.no_grad():
        out, reference = ours(**inputs), marian(**inputs)
    assert out.loss.dtype == torch.float64
    assert (out.logits - reference.logits).abs().max().item() < 1e-12
    assert abs(out.loss.item() - reference.loss.item()) < 1e-12
    if eager:
        assert out.cross_attentions[-1].dtype == torch.float64
        assert (out.cross_attentions[-1] - reference.cross_attentions[-1]).abs().max().item() < 1e-12


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_a_float64_model_under_cpu_autocast_stays_float64_as_marian_does(autocast_dtype):
    """Autocast leaves float64 alone: the masks too (SDPA refused a bfloat16 mask beside float64 queries)."""
    ours = make_model().double()
    marian = to_marian(ours).eval()
    source, mask = padded_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype):
        logits = ours(input_ids=source, attention_mask=mask, decoder_input_ids=source[:, :5]).logits
        reference = marian(input_ids=source, attention_mask=mask, decoder_input_ids=source[:, :5]).logits
        settings = dict(attention_mask=mask, max_new_tokens=6)
        for beams in (1, 3):
            assert torch.equal(ours.generate(source, num_beams=beams, **settings),
                               marian.generate(source, num_beams=beams, **settings))
    assert logits.dtype == torch.float64 and (logits - reference).abs().max().item() < 1e-12


def test_embeddings_given_in_a_lower_precision_are_promoted_as_marian_does():
    ours = make_model().double()
    marian = to_marian(ours).eval()
    source, mask = padded_batch()
    embeds = ours.get_input_embeddings()(source).float()  # scaled by sqrt(d_model), as the lookup scales
    inputs = dict(inputs_embeds=embeds, attention_mask=mask)
    scale = math.sqrt(ours.config.d_model)  # Marian's decoder scales `decoder_inputs_embeds` again (our docstring)
    with torch.no_grad():
        logits = ours(**inputs, decoder_inputs_embeds=embeds[:, :5]).logits
        reference = marian(**inputs, decoder_inputs_embeds=embeds[:, :5] / scale).logits
    # 1e-6: Marian's division and multiplication by the scale round in float32
    assert logits.dtype == reference.dtype == torch.float64 and (logits - reference).abs().max().item() < 1e-6


def test_fast_generate_of_a_float32_model_under_a_float64_default_dtype(monkeypatch):
    """`torch.set_default_dtype(torch.float64)` before loading a float32 model: the search's padded rows (AMD's and
    the Hub copy's setting, for weights of 2^18 values or more) are float32 too, and the tokens are transformers'."""
    use_few_rows_settings(monkeypatch, "amd")
    model = make_model(d_model=256, encoder_ffn_dim=1024, decoder_ffn_dim=1024, encoder_layers=1, decoder_layers=1)
    source = torch.tensor([[5, 6, 7, 8, 2]])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for beams in (1, 4):
            settings = dict(num_beams=beams, max_new_tokens=5)
            assert torch.equal(model.generate(source, **settings), GenerationMixin.generate(model, source, **settings))
    finally:
        torch.set_default_dtype(previous)


def test_labels_without_a_padding_id_are_refused_naming_it():
    model = make_model(pad_token_id=None)
    source, mask = padded_batch()
    with pytest.raises(ValueError, match=r"`labels` need `config.pad_token_id`, which is None"):
        model(input_ids=source, attention_mask=mask, labels=source)


def test_from_marian_round_trip_keeps_output_bias():
    """OPUS-MT checkpoints carry a logits bias: from_marian keeps it, and the ported model matches Marian."""
    marian = to_marian(make_model()).eval()
    with torch.no_grad():
        marian.final_logits_bias.normal_()
    ours = from_marian(marian).eval()
    assert ours.config.output_bias
    source, mask = padded_batch()
    with torch.no_grad():
        ours_logits = ours(input_ids=source, attention_mask=mask, decoder_input_ids=source).logits
        reference = marian(input_ids=source, attention_mask=mask, decoder_input_ids=source).logits
    assert (ours_logits - reference).abs().max().item() < 1e-5


def test_an_opus_mt_bias_trains_here_and_fine_tunes_as_marian_once_frozen():
    """Marian keeps `final_logits_bias` as a buffer; ours is a parameter (documented in the README). Frozen, three
    Adam steps from the same Marian model end at Marian's logits; trained, they do not."""
    marian = to_marian(make_model(dropout=0.0)).eval()
    with torch.no_grad():
        marian.final_logits_bias.normal_()
    source, mask = padded_batch()
    labels = source.roll(1, dims=1)

    def fine_tuned(model):
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            model(input_ids=source, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
        with torch.no_grad():
            return model.eval()(input_ids=source, attention_mask=mask, decoder_input_ids=source).logits

    ours = from_marian(marian)
    assert ours.lm_head.bias.requires_grad
    trained = fine_tuned(ours)
    frozen = from_marian(marian)
    frozen.lm_head.bias.requires_grad_(False)
    frozen = fine_tuned(frozen)
    reference = fine_tuned(marian)
    torch.testing.assert_close(frozen, reference, rtol=1e-4, atol=1e-4)
    assert (trained - reference).abs().max() > 1e-2


def test_from_marian_refuses_separate_source_and_target_embeddings():
    """A Marian model with tie_word_embeddings=False has its own encoder and decoder embeddings in transformers 5;
    ours has one matrix (Section 3.4), so converting would silently change the function."""
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    marian = MarianMTModel(MarianConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                        decoder_ffn_dim=32, pad_token_id=0, decoder_start_token_id=0,
                                        tie_word_embeddings=False)).eval()
    if marian.model.encoder.embed_tokens.weight.data_ptr() == marian.model.shared.weight.data_ptr():
        pytest.skip("this transformers ties Marian's embeddings to `shared` whatever tie_word_embeddings says")
    with torch.no_grad():
        marian.model.encoder.embed_tokens.weight.normal_()
    with pytest.raises(ValueError, match="encoder embeddings differ from `model.shared`"):
        from_marian(marian)
    with torch.no_grad():
        marian.model.encoder.embed_tokens.weight.copy_(marian.model.shared.weight)
        marian.model.decoder.embed_tokens.weight.copy_(marian.model.shared.weight)
    from_marian(marian)  # equal copies convert


def test_a_marian_file_holding_the_shared_embedding_once_converts(tmp_path):
    """transformers 4 saved one shared matrix once, as `model.shared.weight`; transformers 5 reads such a file with
    tie_word_embeddings=False as if the stacks' embeddings were missing. Conversion ties them to `shared` again."""
    from transformers import MarianConfig, MarianMTModel

    from modeling_seq2seq.convert import load_for_conversion

    torch.manual_seed(0)
    marian = MarianMTModel(MarianConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                        decoder_ffn_dim=32, pad_token_id=0, decoder_start_token_id=0,
                                        tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for stack in (marian.model.encoder, marian.model.decoder):
            stack.embed_tokens.weight.copy_(marian.model.shared.weight)
    marian.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in marian.state_dict().items() if "embed_tokens" not in k},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = from_marian(load_for_conversion(MarianMTModel, str(tmp_path))).eval()
    source, mask = padded_batch()
    with torch.no_grad():
        logits = ours(input_ids=source, attention_mask=mask, decoder_input_ids=source).logits
        reference = marian(input_ids=source, attention_mask=mask, decoder_input_ids=source).logits
    assert (logits - reference).abs().max().item() < 1e-5


# --- The paper's properties ------------------------------------------------------------------------------------------


def test_sinusoids_follow_the_formula_in_both_layouts():
    d_model, positions = 16, torch.arange(40, dtype=torch.float64)[:, None]
    frequencies = torch.tensor([10000 ** (-2 * i / d_model) for i in range(d_model // 2)], dtype=torch.float64)
    sines, cosines = torch.sin(positions * frequencies), torch.cos(positions * frequencies)
    interleaved = SinusoidalPositionalEncoding(d_model, 8, "interleaved")(40, 0, torch.device("cpu"))
    split = SinusoidalPositionalEncoding(d_model, 8, "split")(40, 0, torch.device("cpu"))
    assert torch.allclose(interleaved[:, 0::2].double(), sines, atol=1e-6)
    assert torch.allclose(interleaved[:, 1::2].double(), cosines, atol=1e-6)
    assert torch.allclose(split.double(), torch.cat([sines, cosines], dim=1), atol=1e-6)


def test_inputs_longer_than_max_position_embeddings_work():
    """Sinusoids are a formula: the table grows past max_position_embeddings instead of failing."""
    model = make_model(max_position_embeddings=8)
    source = torch.randint(4, VOCAB, (1, 20))
    with torch.no_grad():
        long_logits = model(input_ids=source, decoder_input_ids=source).logits
    assert long_logits.shape == (1, 20, VOCAB) and torch.isfinite(long_logits).all()
    # The first positions do not depend on how large the table is.
    reference = make_model(max_position_embeddings=64)
    with torch.no_grad():
        assert torch.allclose(reference(input_ids=source, decoder_input_ids=source).logits, long_logits, atol=1e-6)


def test_decoder_is_causal():
    """Changing decoder token t changes no logit before t (Section 3.2.3)."""
    model = make_model()
    source, mask = padded_batch()
    target = torch.randint(4, VOCAB, (4, 10))
    changed = target.clone()
    changed[:, 6] = (changed[:, 6] + 1) % VOCAB
    with torch.no_grad():
        before = model(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
        after = model(input_ids=source, attention_mask=mask, decoder_input_ids=changed).logits
    assert torch.equal(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_padding_does_not_change_a_sequence(implementation):
    model = make_model()
    model.config._attn_implementation = implementation
    source, mask = padded_batch()
    target = torch.randint(4, VOCAB, (4, 7))
    with torch.no_grad():
        batch_logits = model(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
        for i in range(4):
            n = int(mask[i].sum())
            alone = model(input_ids=source[i : i + 1, :n], decoder_input_ids=target[i : i + 1]).logits
            assert (alone[0] - batch_logits[i]).abs().max().item() < 1e-5


def test_eager_and_sdpa_agree():
    eager = make_model()
    eager.config._attn_implementation = "eager"
    sdpa = make_model()
    sdpa.config._attn_implementation = "sdpa"
    source, mask = padded_batch()
    target = torch.randint(4, VOCAB, (4, 7))
    with torch.no_grad():
        a = eager(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
        b = sdpa(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
    assert (a - b).abs().max().item() < 1e-5


def test_attn_implementation_is_selectable_at_load(tmp_path):
    make_model().save_pretrained(tmp_path)
    for implementation in ("eager", "sdpa"):
        model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation


def test_incremental_decoding_with_cache_equals_full_forward():
    model = make_model()
    source, mask = padded_batch()
    target = torch.randint(4, VOCAB, (4, 8))
    with torch.no_grad():
        full = model(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
        encoder_outputs = model.get_encoder()(input_ids=source, attention_mask=mask)
        cache, steps = None, []
        for t in range(target.shape[1]):
            out = model(
                encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=target[:, t : t + 1],
                cache=cache, use_cache=True,
            )
            cache = getattr(out, CACHE_FIELD)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def wide_model():
    """Every weight matrix at least 2^18 floats, so that the decode loop multiplies with oneDNN's kernels."""
    return make_model(d_model=512, encoder_ffn_dim=512, decoder_ffn_dim=512, encoder_attention_heads=8,
                      decoder_attention_heads=8, vocab_size=600)


def test_mkl_is_used_where_it_is_fast_on_intel_cpus_only(monkeypatch):
    """MKL runs its AVX-512 code on Intel CPUs only: there training products and decode steps of one or two rows stay
    with `F.linear`; elsewhere (AMD, or a vendor that cannot be read) the shipped files' oneDNN defaults apply. The
    installed package chose by this machine's vendor."""
    from modeling_seq2seq import cpu

    intel = (False, 2, 0)
    settings = (modeling_seq2seq.ONEDNN_PRODUCTS, decoding_seq2seq.FEW_ROWS_ON_MKL, decoding_seq2seq.PADDED_ROWS)
    assert settings == (intel if cpu.mkl_runs_avx512(cpu.cpu_vendor()) else (True, 0, 6))
    assert [cpu.mkl_runs_avx512(vendor) for vendor in ("GenuineIntel", "AuthenticAMD", "")] == [True, False, False]
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)  # a torch built without MKL
    assert not cpu.mkl_runs_avx512("GenuineIntel")
    for name in ("ONEDNN_PRODUCTS", "FEW_ROWS_ON_MKL", "PADDED_ROWS"):  # restored after the test
        monkeypatch.setattr(modeling_seq2seq if name.startswith("ONEDNN") else decoding_seq2seq, name, None)
    cpu.use_mkl_where_it_is_fast()
    assert (modeling_seq2seq.ONEDNN_PRODUCTS, decoding_seq2seq.FEW_ROWS_ON_MKL, decoding_seq2seq.PADDED_ROWS) == intel


@pytest.fixture
def onednn_products(monkeypatch):
    """Products on oneDNN (`OneDNNLinear` when training), as on AMD CPUs, whatever this machine is."""
    monkeypatch.setattr(modeling_seq2seq, "ONEDNN_PRODUCTS", True)


FEW_ROWS_SETTINGS = {"amd": (0, 6), "intel": (2, 0)}


def use_few_rows_settings(monkeypatch, cpu: str):
    mkl_rows, padded_rows = FEW_ROWS_SETTINGS[cpu]
    monkeypatch.setattr(decoding_seq2seq, "FEW_ROWS_ON_MKL", mkl_rows)
    monkeypatch.setattr(decoding_seq2seq, "PADDED_ROWS", padded_rows)
    return mkl_rows, padded_rows


@pytest.mark.parametrize("cpu", FEW_ROWS_SETTINGS)
def test_decode_step_linear_equals_a_float64_recomputation(cpu, monkeypatch):
    """With either CPU's settings for few rows. Also when it multiplies fewer than `PADDED_ROWS` rows as that many,
    after a call with more rows (the padding rows then hold stale values, which must not leak into the rows
    returned)."""
    mkl_rows, padded_rows = use_few_rows_settings(monkeypatch, cpu)
    model = wide_model()
    linear = DecodeStepLinear(model, torch.device("cpu"), torch.float32)
    for shape in [(5,), (1,), (3,), (2,), (6,), (32,), (3, 1), (1, 1)]:
        for module in (model.lm_head, model.model.decoder.layers[0].feed_forward.fc1):
            x = torch.randn(*shape, module.in_features) * 10
            expected = (x.double() @ module.weight.double().T + (0 if module.bias is None else module.bias.double()))
            output = linear(module, x)
            assert output.shape == expected.shape, shape
            padded = len(shape) == 1 and mkl_rows < shape[0] < padded_rows
            assert (output._base is not None and output._base.shape[0] == padded_rows) == padded, shape
            if len(shape) == 1 and shape[0] <= mkl_rows:  # F.linear's own result, bit for bit
                assert torch.equal(output, F.linear(x, module.weight, module.bias)), shape
            assert torch.allclose(output.double(), expected, atol=1e-3), shape


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_and_its_gradients_equal_a_float64_recomputation(bias, onednn_products):
    torch.manual_seed(0)
    module = torch.nn.Linear(512, 1536, bias=bias)
    x = torch.randn(4, 48, 512, requires_grad=True)
    output = linear(module, x)
    assert ran_on_onednn(output)  # not module(x)
    upstream = torch.randn(output.shape)
    output.backward(upstream)
    reference_module = copy.deepcopy(module).double()
    reference_x = x.detach().double().requires_grad_()
    reference = reference_module(reference_x)
    reference.backward(upstream.double())
    assert torch.allclose(output.double(), reference, atol=1e-4)
    assert torch.allclose(x.grad.double(), reference_x.grad, atol=1e-4)
    assert torch.allclose(module.weight.grad.double(), reference_module.weight.grad, atol=1e-3)
    if bias:
        assert torch.allclose(module.bias.grad.double(), reference_module.bias.grad, atol=1e-3)
    with torch.no_grad(), counting_onednn_calls() as calls:  # inference: oneDNN's kernel alone, no Function
        inferred = linear(module, x)
        assert inferred.grad_fn is None and torch.allclose(inferred.double(), reference, atol=1e-4)
        assert len(calls) == 1


def test_onednn_matmul_runs_only_where_it_computes_in_float32():
    """The backward's products go to oneDNN's matmul under torch's "bf16" matmul precision, so the probe that allows
    it must catch a product that rounds its inputs to bfloat16, in either operand and either layout; the product
    itself must have float32's accuracy; and the process-wide setting must come back, also after an error."""
    def rounds(which):
        def product(left, right):
            operands = [left, right]
            for index in which(left):
                operands[index] = operands[index].bfloat16().float()
            return operands[0] @ operands[1]
        return product

    assert computes_in_float32(torch.mm)
    assert not computes_in_float32(rounds(lambda left: (0, 1)))
    assert not computes_in_float32(rounds(lambda left: (0,)))
    assert not computes_in_float32(rounds(lambda left: (1,)))
    assert not computes_in_float32(rounds(lambda left: () if left.is_contiguous() else (0,)))  # d/dW's layout only
    assert not computes_in_float32(rounds(lambda left: (0,) if left.is_contiguous() else ()))  # d/dx's layout only
    assert not computes_in_float32(rounds(lambda left: (0,) if min(left.shape) > 64 else ()))  # training-sized only
    precision = torch.backends.mkldnn.matmul.fp32_precision
    torch.manual_seed(0)
    grad_rows, rows = torch.randn(300, 1536), torch.randn(300, 512)
    for left, right in ((grad_rows.t(), rows), (grad_rows, torch.randn(1536, 512))):
        expected = left.double() @ right.double()
        error = (onednn_matmul(left, right).double() - expected).abs().max() / expected.abs().max()
        assert error < 1e-5, error  # bfloat16 inputs: ~1e-3
        assert torch.backends.mkldnn.matmul.fp32_precision == precision
    with pytest.raises(RuntimeError):
        onednn_matmul(grad_rows.t(), rows[:5])
    assert torch.backends.mkldnn.matmul.fp32_precision == precision


def test_onednn_matmul_is_not_used_on_a_cpu_with_amx(monkeypatch):
    """On the GPU machine's Xeon (AMX), under the "bf16" precision oneDNN rounded products of 128x512 @ 512x128 and
    larger to bfloat16 (relative error ~2e-3) and computed the 64x48 ones exactly: a CPU with AMX keeps MKL's float32
    products, whatever the probe says."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr("modeling_seq2seq.modeling_seq2seq.computes_in_float32", lambda product: True)
    monkeypatch.setattr("modeling_seq2seq.modeling_seq2seq.onednn_matmul_probe", {})
    assert not onednn_matmul_keeps_float32()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr("modeling_seq2seq.modeling_seq2seq.onednn_matmul_probe", {})
    assert onednn_matmul_keeps_float32() == (onednn_linear_kernel() is not None)


def ran_on_onednn(output):
    node = output.grad_fn
    while type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return type(node).__name__ == "OneDNNLinearBackward"


@contextlib.contextmanager
def counting_onednn_calls():
    """The shapes of the inputs that `linear` hands oneDNN's kernel while the block runs."""
    calls, kernel = [], modeling_seq2seq.onednn_linear_kernel()

    def counted(rows, *args):
        calls.append(tuple(rows.shape))
        return kernel(rows, *args)

    original = modeling_seq2seq.onednn_linear_kernel
    modeling_seq2seq.onednn_linear_kernel = lambda: counted
    try:
        yield calls
    finally:
        modeling_seq2seq.onednn_linear_kernel = original


def test_onednn_linear_output_can_be_edited_in_place_and_differentiated_twice(onednn_products):
    torch.manual_seed(0)
    module = torch.nn.Linear(512, 1024)
    x = torch.randn(3, 40, 512, requires_grad=True)
    reference = copy.deepcopy(module)
    reference_x = x.detach().clone().requires_grad_()
    results = []
    for layer, inputs, run in ((module, x, linear), (reference, reference_x, lambda m, v: m(v))):
        output = run(layer, inputs)
        output.relu_()  # in place on the output, as an in-place activation or a hook would
        (grad_x,) = torch.autograd.grad(output.square().sum(), inputs, create_graph=True)
        grad_x.square().sum().backward()  # a gradient penalty: backward through the backward
        results.append((output.detach(), inputs.grad, layer.weight.grad))
    assert ran_on_onednn(linear(module, x))
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-3 * theirs.abs().max().item())


class ScaledLinear(torch.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao, mkldnn.flags
def test_linear_runs_the_module_itself_unless_the_product_is_all_it_computes(monkeypatch, onednn_products):
    """Anything that changes what a layer computes (hooks, subclasses, accelerate's replaced forward, autocast,
    other dtypes) keeps the module's own call; so does a product too small for oneDNN to pay off."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 512)
    cases = {}
    hooked = torch.nn.Linear(512, 512)
    hooked.register_forward_hook(lambda module, inputs, output: output + 1)
    cases["forward hook"] = hooked
    cases["subclass"] = ScaledLinear(512, 512)
    replaced = torch.nn.Linear(512, 512)
    original_forward = replaced.forward
    replaced.forward = lambda x: original_forward(x) * 3  # as accelerate's add_hook_to_module does
    cases["replaced forward"] = replaced
    for name, module in cases.items():
        output = linear(module, x)
        assert torch.equal(output, module(x)), name
        assert not torch.allclose(output, torch.nn.functional.linear(x, module.weight, module.bias)), name
    plain = torch.nn.Linear(512, 512)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: output - 1)
    try:
        assert torch.equal(linear(plain, x), plain(x))
    finally:
        handle.remove()
    assert ran_on_onednn(linear(plain, x.requires_grad_()))
    assert not ran_on_onednn(linear(plain, x[:, :4]))  # 2^20 multiply-adds only
    assert ran_on_onednn(linear(copy.deepcopy(plain).eval(), x))  # evaluation with gradients: the Function too
    with torch.backends.mkldnn.flags(enabled=False):
        assert not ran_on_onednn(linear(plain, x))
    monkeypatch.setattr(modeling_seq2seq, "ONEDNN_PRODUCTS", False)  # an Intel CPU: MKL, by the module
    assert not ran_on_onednn(linear(plain, x)) and torch.equal(linear(plain, x), plain(x))
    monkeypatch.setattr(modeling_seq2seq, "ONEDNN_PRODUCTS", True)
    with torch.autograd.forward_ad.dual_level():  # forward-mode AD
        dual = torch.autograd.forward_ad.make_dual(x.detach(), torch.ones_like(x))
        tangent = torch.autograd.forward_ad.unpack_dual(linear(plain, dual)).tangent
        assert torch.allclose(tangent, torch.ones_like(x) @ plain.weight.detach().T)
    quantized = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(plain), {torch.nn.Linear})[0]
    assert torch.equal(linear(quantized, x.detach()), quantized(x.detach()))  # its `weight` is a method
    lazy = torch.nn.LazyLinear(512)
    assert linear(lazy, x).shape == x.shape  # no weight before its first call
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(plain, x).dtype == torch.bfloat16
    assert linear(copy.deepcopy(plain).double(), x.double()).dtype == torch.float64


def test_a_trainable_bias_of_a_frozen_layer_gets_its_gradient(onednn_products):
    """Fine-tuning the biases alone (BitFit): a frozen weight and an input without gradient still leave the bias
    trainable, so the product must go through `OneDNNLinear`, not the bare kernel; in the model too."""
    torch.manual_seed(0)
    module = torch.nn.Linear(1024, 1024)
    module.weight.requires_grad_(False)
    x, upstream = torch.randn(4, 40, 1024), torch.randn(4, 40, 1024)
    linear(module, x).backward(upstream)
    torch.testing.assert_close(module.bias.grad, upstream.sum((0, 1)), rtol=1e-5, atol=1e-4)
    model = make_model(d_model=512, encoder_ffn_dim=1024, decoder_ffn_dim=1024, encoder_attention_heads=8,
                       decoder_attention_heads=8, vocab_size=2048, dropout=0.0).train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.endswith(".bias"))
    source, mask = padded_batch(batch=8, length=24, vocab=2048)
    model(input_ids=source, attention_mask=mask, labels=torch.randint(4, 2048, (8, 20))).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_training_gradients_match_marian_where_products_run_on_onednn(onednn_products, monkeypatch):
    """At widths where every training product goes through OneDNNLinear, loss and gradients equal MarianMTModel's
    (MKL) up to float rounding, and so do inference logits, whose products go to oneDNN's kernel alone; with Intel
    CPUs' setting (MKL), inference logits are Marian's bit for bit."""
    torch.manual_seed(0)
    ours = make_model(d_model=512, encoder_ffn_dim=1024, decoder_ffn_dim=1024, encoder_attention_heads=8,
                      decoder_attention_heads=8, vocab_size=2048, dropout=0.0, label_smoothing=0.0).train()
    marian = to_marian(ours).train()
    source, mask = padded_batch(batch=8, length=24, vocab=2048)
    labels = torch.randint(4, 2048, (8, 20))
    labels[:, -3:] = -100
    loss = ours(input_ids=source, attention_mask=mask, labels=labels).loss
    reference = marian(input_ids=source, attention_mask=mask, labels=labels).loss
    loss.backward()
    reference.backward()
    assert abs(loss.item() - reference.item()) < 1e-5
    pairs = [
        (ours.model.shared.weight, marian.model.shared.weight),
        (ours.model.encoder.layers[0].feed_forward.fc1.weight, marian.model.encoder.layers[0].fc1.weight),
        (ours.model.decoder.layers[-1].feed_forward.fc2.bias, marian.model.decoder.layers[-1].fc2.bias),
        (ours.model.decoder.layers[0].cross_attn.out_proj.weight, marian.model.decoder.layers[0].encoder_attn.out_proj.weight),
    ]
    for mine, theirs in pairs:
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6 * theirs.grad.abs().max().item())
    with torch.no_grad():  # inference: oneDNN's kernel, Marian's logits up to float rounding
        with counting_onednn_calls() as calls:
            logits = ours.eval()(input_ids=source, attention_mask=mask, labels=labels).logits
        # Encoder layers: QKV, out, fc1, fc2; decoder layers: those and cross-attention's query, keys-values, out.
        assert len(calls) == 2 * 4 + 2 * 7 + 1  # and the output projection
        expected = marian.eval()(input_ids=source, attention_mask=mask, labels=labels).logits
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        monkeypatch.setattr(modeling_seq2seq, "ONEDNN_PRODUCTS", False)
        with counting_onednn_calls() as calls:
            assert torch.equal(ours(input_ids=source, attention_mask=mask, labels=labels).logits, expected)
        assert calls == []


def test_decode_weights_cached_in_onednn_layout_follow_every_kind_of_weight_edit():
    model = wide_model()
    source, mask = padded_batch(vocab=600)

    def check():
        for settings in (dict(num_beams=1, max_new_tokens=8), dict(num_beams=3, max_new_tokens=8, length_penalty=0.6)):
            assert torch.equal(model.generate(source, attention_mask=mask, **settings),
                               GenerationMixin.generate(model, source, attention_mask=mask, **settings)), settings

    check()
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # version counter moves
    check()
    generator = torch.Generator().manual_seed(1)
    model.lm_head.weight.data.copy_(model.lm_head.weight.data[torch.randperm(600, generator=generator)])  # it does not
    check()
    model.model.decoder.layers[1].feed_forward.fc2.weight.data[5] = 3.0  # one row, behind autograd's back
    check()
    layer = model.model.decoder.layers[0].self_attn
    layer.qkv_proj.weight = torch.nn.Parameter(torch.randn_like(layer.qkv_proj.weight))  # a new tensor
    check()
    # `vector_to_parameters` assigns `.data` (new storage, same version counter): one output-projection row made to
    # win, every element but the one the sample reads
    with torch.no_grad():
        states = model(input_ids=source, attention_mask=mask, decoder_input_ids=source[:, :1],
                       output_hidden_states=True).decoder_hidden_states[-1][:, -1].mean(0)
    token, width = 77, model.config.d_model
    row = torch.nn.utils.parameters_to_vector([model.lm_head.weight]).detach().view(-1, width)
    unsampled = torch.arange(width) != (-(token * width) % 509)
    row[token, unsampled] = (states / states.norm() * 1e3)[unsampled]
    torch.nn.utils.vector_to_parameters(row.reshape(-1), [model.lm_head.weight])
    assert (GenerationMixin.generate(model, source, attention_mask=mask, max_new_tokens=3)[:, 1:] == token).any()
    check()


def test_decode_weights_cached_in_onednn_layout_see_any_row_replaced_through_data_in_narrow_matrices():
    """Rows narrower than the 509-element sampling stride: every row is still read, so output-projection rows
    replaced behind autograd's back (new tokens initialised through `.data` after a `generate`) are seen. With the
    stride at 509, 3 of every 4 rows of 128 went unread, and the search kept multiplying by the old rows."""
    model = make_model(d_model=128, vocab_size=4096, encoder_attention_heads=4, decoder_attention_heads=4)
    assert model.lm_head.weight.numel() >= 2**18  # kept in oneDNN's layout
    source, mask = padded_batch(vocab=4096)
    first = model.generate(source, attention_mask=mask, max_new_tokens=8, num_beams=1)
    weight, width = model.lm_head.weight, model.config.d_model
    read_before = {k // width for k in range(0, weight.numel(), 509)}
    rows = [r for r in range(100, 400) if r not in read_before]
    weight.data[rows[:10]] = 3 * weight.data[first[0, 1]]  # rows the old stride never read
    for settings in (dict(num_beams=1, max_new_tokens=8), dict(num_beams=4, max_new_tokens=8, length_penalty=0.6)):
        expected = GenerationMixin.generate(model, source, attention_mask=mask, **settings)
        assert expected[:, 1].tolist() != first[:, 1].tolist()  # the edit changes the search
        assert torch.equal(model.generate(source, attention_mask=mask, **settings), expected), settings


def test_a_search_drops_the_decode_weights_of_layers_the_model_no_longer_has():
    """`resize_token_embeddings` of an untied model replaces its output projection: the old one's copy in oneDNN's
    layout, and with it the old weight, are not kept."""
    model = make_model(d_model=512, encoder_ffn_dim=512, decoder_ffn_dim=512, encoder_attention_heads=8,
                       decoder_attention_heads=8, vocab_size=600, tie_word_embeddings=False)
    source, mask = padded_batch(vocab=600)
    model.generate(source, attention_mask=mask, max_new_tokens=3)
    copies = len(model._packed_decode_weights)
    old_weight = weakref.ref(model.lm_head.weight)
    for size in (650, 700):
        model.resize_token_embeddings(size, mean_resizing=False)
        model.generate(source, attention_mask=mask, max_new_tokens=3)
    gc.collect()
    assert old_weight() is None and len(model._packed_decode_weights) == copies


def test_the_bf16_matmul_setting_is_restored_when_threads_interleave():
    """`matmul_under_bf16_precision` switches a process-wide setting: threads running such products at once leave it
    as they found it (a save and restore per product could leave "bf16" for good)."""
    settings = torch.backends.mkldnn.matmul
    before = settings.fp32_precision
    matrix = torch.randn(96, 96)
    start = threading.Barrier(4)

    def products():
        start.wait()
        for _ in range(400):
            matmul_under_bf16_precision(matrix, matrix)

    threads = [threading.Thread(target=products) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert settings.fp32_precision == before


def test_generate_encodes_with_the_search_kernels_and_leaves_the_encoders_forward_as_it_was():
    model = wide_model()
    source, mask = padded_batch(vocab=600)
    encoder = model.get_encoder()
    expected = encoder(input_ids=source, attention_mask=mask).last_hidden_state
    model.generate(source, attention_mask=mask, num_beams=1, max_new_tokens=3)
    assert id(encoder.layers[0].feed_forward.fc1) in vars(model)["_packed_decode_weights"]
    assert search_linear.get() is None
    assert torch.equal(encoder(input_ids=source, attention_mask=mask).last_hidden_state, expected)  # F.linear again


def test_an_evaluation_forward_compiles_as_one_graph():
    """`linear` looks up `search_linear` in evaluation; under dynamo it must not (that lookup breaks the graph)."""
    model = make_model()
    source, mask = padded_batch()
    labels = source[:, :7]
    expected = model(input_ids=source, attention_mask=mask, labels=labels).logits
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(input_ids=source, attention_mask=mask, labels=labels).logits, expected)


def test_a_model_that_has_decoded_can_be_copied_and_pickled():
    """The oneDNN weight copies live on the model; they cannot be copied or saved, so copies start without them."""
    model = wide_model()
    source, mask = padded_batch(vocab=600)
    settings = dict(num_beams=2, max_new_tokens=6)
    expected = GenerationMixin.generate(model, source, attention_mask=mask, **settings)
    assert torch.equal(model.generate(source, attention_mask=mask, **settings), expected)
    assert len(vars(model)["_packed_decode_weights"]) > 0  # the fast path did use oneDNN's layout
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert len(vars(twin)["_packed_decode_weights"]) == 0
        assert torch.equal(twin.generate(source, attention_mask=mask, **settings), expected)
    twin.lm_head.weight.data.mul_(-1)  # the twin's layers are its own: the original still decodes as before
    assert torch.equal(model.generate(source, attention_mask=mask, **settings), expected)


@pytest.mark.parametrize("precision", ["bfloat16", "float16", "autocast-bfloat16"])
def test_fast_generate_in_half_precision_on_cpu_equals_transformers_generate(precision):
    """Half precision takes the module path of the decode loop (no oneDNN copies), with the same tokens."""
    model = make_model()
    autocast = precision.startswith("autocast")
    if not autocast:
        model = model.to(getattr(torch, precision))
    source, mask = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert_fast_generate_equals_transformers_generate(model, source, mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_beams_on_cpu_equal_transformers_beams(dtype, monkeypatch):
    """A sentence's beams attended to its keys as one block of queries, which in half precision rounds otherwise than
    transformers' one query per row (an ulp in ~7% of fp16 logits): enough to return other beams (seen here at the
    second seed). Each row now queries alone in half precision on a CPU."""
    torch.manual_seed(1)
    model = Seq2SeqTransformerForConditionalGeneration(load_preset("tiny", vocab_size=1000, dropout=0.0)).eval().to(dtype)
    for seed in (10, 11, 12, 14):  # 11 (float16) and 14 (bfloat16) returned other beams
        source, mask = padded_batch(seed, 8, 17, 1000)
        settings = dict(num_beams=4, num_return_sequences=2, max_new_tokens=24, attention_mask=mask)
        assert torch.equal(model.generate(source, **settings), GenerationMixin.generate(model, source, **settings)), seed
    # The keys and values are repeated per beam once per search: sentences that finish early (the end token made
    # likelier) must drop their rows of them, here sentences 1, then 2, from the middle of the batch.
    kept = []
    keep_sentences = IncrementalDecoder.keep_sentences
    monkeypatch.setattr(IncrementalDecoder, "keep_sentences",
                        lambda decoder, sentences: kept.append(sentences.tolist()) or keep_sentences(decoder, sentences))
    with torch.no_grad():
        model.model.shared.weight[model.config.eos_token_id] *= 4
    source, mask = padded_batch(26, 8, 17, 1000)
    settings = dict(num_beams=4, num_return_sequences=2, max_new_tokens=24, attention_mask=mask)
    assert torch.equal(model.generate(source, **settings), GenerationMixin.generate(model, source, **settings))
    assert kept[:2] == [[0, 2, 3, 4, 5, 6, 7], [0, 1, 3, 4, 5, 6]]


def test_a_float32_mask_under_half_precision_blocks_without_nan():
    """A float32 4D mask's minimum rounds to -inf in bfloat16 (autocast, or half weights): a row whose keys are all
    blocked (a left-padded one) was NaN, and the NaN spread to the whole sentence in the next layer (the loss too)."""
    model = make_model()
    model.set_attn_implementation("eager")
    source, source_mask = padded_batch(1)
    target, _ = padded_batch(2, length=9)
    allowed = torch.tril(torch.ones(9, 9, dtype=torch.bool))[None, None].repeat(4, 1, 1, 1)
    allowed[1, :, :, :3] = False  # row 1 left-padded by three
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    inputs = dict(input_ids=source, attention_mask=source_mask, decoder_input_ids=target, decoder_attention_mask=mask)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not model(**inputs).logits.isnan().any()
    with torch.no_grad():
        # A half-precision mask given to a float32 model (the clamp to float32's minimum overflowed float16).
        for dtype in (torch.float16, torch.bfloat16):
            half = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            assert not model(**{**inputs, "decoder_attention_mask": half}).logits.isnan().any()
        assert not model.to(torch.bfloat16)(**inputs).logits.isnan().any()


def test_beam_search_keeps_its_scores_in_float32_whatever_the_default_dtype():
    """torch.full((batch, beams), -1e9) took the default dtype: with float16 it raised an overflow."""
    model = make_model()
    source, mask = padded_batch()
    expected = model.generate(source, attention_mask=mask, num_beams=3, max_new_tokens=6)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        assert torch.equal(model.generate(source, attention_mask=mask, num_beams=3, max_new_tokens=6), expected)
    finally:
        torch.set_default_dtype(default)


def assert_fast_generate_equals_transformers_generate(model, source, mask):
    """Greedy and beam search through our `generate` give the ids of transformers' own `generate`."""
    for num_beams in (1, 3):
        settings = dict(num_beams=num_beams, max_new_tokens=6)
        assert torch.equal(model.generate(source, attention_mask=mask, **settings),
                           GenerationMixin.generate(model, source, attention_mask=mask, **settings)), settings


def test_fast_generate_runs_hooks_and_replaced_layers_like_transformers_generate():
    model = make_model()
    source, mask = padded_batch()
    feed_forward = model.model.decoder.layers[0].feed_forward
    feed_forward.register_forward_hook(lambda module, inputs, output: output * -3)
    model.model.decoder.layers[1].cross_attn_layer_norm.register_forward_hook(lambda module, inputs, output: output.flip(-1))
    model.model.decoder.layers[1].self_attn.out_proj = torch.nn.utils.parametrizations.weight_norm(
        model.model.decoder.layers[1].self_attn.out_proj)  # no longer a plain nn.Linear forward
    assert_fast_generate_equals_transformers_generate(model, source, mask)


@pytest.mark.parametrize("watched", ["layer", "self_attn", "cross_attn", "pre_hook", "subclass", "norm_forward",
                                     "feed_forward_forward", "accelerate_hook"])
def test_fast_generate_defers_to_transformers_where_a_skipped_forward_is_watched_or_changed(watched):
    """The fast search skips the `forward` of the decoder layers, their attentions and the model, and computes plain
    layer norms and feed-forward blocks itself: a hook on one of them, a `forward` replaced on the instance (as
    accelerate's hooks do) or a subclass's own `forward` must act as in transformers' loop (called at each step,
    the same tokens), not be passed over."""
    model = make_model()
    source, mask = padded_batch()
    layer = model.model.decoder.layers[1]
    calls = []

    def shift(module, inputs, output):
        calls.append(1)
        return (output[0] + 0.5, *output[1:]) if isinstance(output, tuple) else output + 0.5

    if watched == "pre_hook":
        layer.self_attn.register_forward_pre_hook(lambda module, args: calls.append(1))
    elif watched == "subclass":
        banned = int(model.generate(source, attention_mask=mask, num_beams=1, max_new_tokens=1)[1, -1])  # a first pick

        class Banning(Seq2SeqTransformerForConditionalGeneration):
            def forward(self, *args, **kwargs):
                calls.append(1)
                output = super().forward(*args, **kwargs)
                output.logits[..., banned] = -1e4
                return output

        model = Banning(model.config).eval()
    elif watched in ("norm_forward", "feed_forward_forward"):
        module = layer.final_layer_norm if watched == "norm_forward" else layer.feed_forward
        plain = module.forward
        module.forward = lambda hidden: shift(module, (hidden,), plain(hidden))
    elif watched == "accelerate_hook":
        from accelerate.hooks import ModelHook, add_hook_to_module

        class Shift(ModelHook):
            def post_forward(self, module, output):
                return shift(module, (), output)

        add_hook_to_module(layer.self_attn_layer_norm, Shift())
    else:
        (layer if watched == "layer" else getattr(layer, watched)).register_forward_hook(shift)
    for num_beams in (1, 3):
        calls.clear()
        settings = dict(num_beams=num_beams, max_new_tokens=6, min_new_tokens=6)
        ours = model.generate(source, attention_mask=mask, **settings)
        assert len(calls) == 6 or (watched == "subclass" and len(calls) >= 6), (num_beams, len(calls))
        assert torch.equal(ours, GenerationMixin.generate(model, source, attention_mask=mask, **settings))
        if watched == "subclass":
            assert not (ours[:, 1:] == banned).any()


def test_generate_positional_processors_as_transformers_takes_them():
    """transformers' `generate(inputs, generation_config, logits_processor, stopping_criteria, ...)` by position."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model = make_model()
    source, mask = padded_batch()
    settings = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6)
    plain = model.generate(source, **settings)
    token = int(plain[1, 1])

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.index_fill(1, torch.tensor([token]), float("-inf"))

    banned = model.generate(source, None, LogitsProcessorList([Ban()]), **settings)
    assert torch.equal(banned, model.generate(source, logits_processor=LogitsProcessorList([Ban()]), **settings))
    assert not (banned[:, 1:] == token).any()


def test_generate_in_training_mode_with_gradient_checkpointing_keeps_the_cache():
    """Generating from a model left in training mode with checkpointing on (a Trainer's evaluation callback): without
    gradients there is no backward to replay, so the cache must be kept, as transformers' layers do; Marian's
    scores are the reference."""
    model = make_model(dropout=0.0)
    marian = to_marian(model).eval()
    source, mask = padded_batch()
    settings = dict(attention_mask=mask, max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    model.train().gradient_checkpointing_enable()
    ours, theirs = model.generate(source, **settings), marian.generate(source, **settings)
    assert torch.equal(ours.sequences, theirs.sequences)
    for step, (a, b) in enumerate(zip(ours.logits, theirs.logits)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")
    with torch.no_grad():
        out = model(input_ids=source, attention_mask=mask, decoder_input_ids=source[:, :2], use_cache=True)
        assert getattr(out, CACHE_FIELD) is not None


def test_beam_search_leaves_the_logits_a_hook_keeps_alone():
    """Beam search takes the log-softmax of the scripted step's logits in place; logits that a hook on the output
    projection has seen (the step then runs module by module) stay as the hook saw them."""
    model = make_model()
    source, mask = padded_batch()
    kept = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: kept.append((inputs[0], output, output.clone())))
    model.generate(source, attention_mask=mask, num_beams=4, max_new_tokens=5)
    assert len(kept) == 5 and all(hidden.dim() == 2 for hidden, _, _ in kept)  # our search's (rows, d_model) steps
    assert all(torch.equal(output, copy) for _, output, copy in kept)


def test_cross_attention_keys_are_computed_once_per_generate_call():
    model = make_model()
    calls = []
    for layer in model.model.decoder.layers:
        layer.cross_attn.kv_proj.register_forward_hook(lambda *args: calls.append(1))
    source, mask = padded_batch()
    model.generate(source, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, num_beams=1)
    assert len(calls) == model.config.decoder_layers


@pytest.mark.parametrize("num_beams", [1, 4])
def test_generate_leaves_no_inference_tensors_behind(num_beams):
    """The CPU search runs in inference mode; what outlives it is normal: the tokens (edited in place here), and the
    positional table that the first `generate` of a fresh model builds, which training then uses."""
    model = make_model()
    source, mask = padded_batch()
    tables = [model.model.encoder.embed_positions, model.model.decoder.embed_positions]
    assert tables[0] is not tables[1] and all(positions.table is None for positions in tables)
    ids = model.generate(source, attention_mask=mask, num_beams=num_beams, max_new_tokens=5)
    assert not ids.is_inference() and not any(positions.table.is_inference() for positions in tables)
    ids[ids == model.config.pad_token_id] = -100
    model.train()
    model(input_ids=source, attention_mask=mask, labels=ids).loss.backward()
    assert model.model.shared.weight.grad is not None


@pytest.mark.parametrize("settings", [dict(num_beams=1), dict(num_beams=4, length_penalty=0.6)])
def test_generation_is_the_same_with_and_without_cache(settings):
    model = make_model()
    source, mask = padded_batch()
    with_cache = model.generate(source, attention_mask=mask, max_new_tokens=10, use_cache=True, **settings)
    without = model.generate(source, attention_mask=mask, max_new_tokens=10, use_cache=False, **settings)
    assert torch.equal(with_cache, without)


def test_generate_modes():
    model = make_model()
    source, mask = padded_batch()
    greedy = model.generate(source, attention_mask=mask, num_beams=1, do_sample=False, max_new_tokens=5)
    assert greedy.shape[0] == 4 and greedy.shape[1] <= 6
    assert (greedy[:, 0] == model.config.decoder_start_token_id).all()
    beams = model.generate(source, attention_mask=mask, num_beams=4, num_return_sequences=3, max_new_tokens=5)
    assert beams.shape[0] == 12
    torch.manual_seed(0)
    sampled = model.generate(source, attention_mask=mask, do_sample=True, num_beams=1, top_k=0, max_new_tokens=5,
                             num_return_sequences=2)
    assert sampled.shape[0] == 8
    # The paper's decoding settings are the default (Section 6.1).
    assert model.generation_config.num_beams == 4 and model.generation_config.length_penalty == 0.6
    default = model.generate(source, attention_mask=mask, max_new_tokens=5)
    explicit = model.generate(source, attention_mask=mask, max_new_tokens=5, num_beams=4, length_penalty=0.6)
    assert torch.equal(default, explicit)


def test_a_generation_config_takes_what_it_leaves_unset_from_the_models():
    """transformers fills the fields a passed `GenerationConfig` leaves unset from `model.generation_config` (here
    beam 4, length penalty 0.6 and a start token other than bos): the fast search must do the same."""
    model = make_model(output_bias=True, decoder_start_token_id=3)
    with torch.no_grad():
        model.lm_head.bias[2] = 0.8
    marian = to_marian(model).eval()
    source, mask = padded_batch()
    for fields in (dict(eos_token_id=2, pad_token_id=0, decoder_start_token_id=1), dict(num_beams=2, eos_token_id=2),
                   dict(num_beams=1, bos_token_id=1)):
        config = GenerationConfig(max_new_tokens=8, **fields)
        assert model.fast_search_settings(source, config, dict(attention_mask=mask)) is not None
        ours = model.generate(source, attention_mask=mask, generation_config=config)
        assert torch.equal(ours, marian.generate(source, attention_mask=mask, generation_config=config)), fields
        assert torch.equal(ours, GenerationMixin.generate(model, source, attention_mask=mask, generation_config=config))


def test_the_default_length_gives_transformers_number_of_new_tokens():
    """Without max_length anywhere (a generation config converted from OPUS-MT has none), transformers generates its
    default 20 new tokens, within max_position_embeddings."""
    source, mask = padded_batch()
    for positions, expected_length in ((64, 1 + 20), (12, 12)):
        model = make_model(max_position_embeddings=positions)
        model.generation_config.max_length = None
        for num_beams in (1, 3):
            assert model.fast_search_settings(source, None, dict(num_beams=num_beams)) is not None
            ours = model.generate(source, attention_mask=mask, num_beams=num_beams)
            assert ours.shape[1] == expected_length
            assert torch.equal(ours, GenerationMixin.generate(model, source, attention_mask=mask, num_beams=num_beams))


def test_fast_generate_gives_transformers_warnings_about_the_lengths():
    """A minimum length that the maximum cuts short, or transformers' own default maximum: the fast search warns as
    transformers' `generate` does (it gave no warning), apart from the note that max_new_tokens overrides a saved
    max_length (every generate(max_new_tokens=...) of a saved model would print it)."""
    import warnings

    source, mask = padded_batch()

    def warnings_of(generate, model, **settings):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = generate(model, source, attention_mask=mask, **settings)
        return output, [str(warning.message) for warning in caught if warning.category is UserWarning]

    model, unset = make_model(), make_model()
    unset.generation_config.max_length = None
    for model, settings in [
        (model, dict(num_beams=2, max_new_tokens=3, min_new_tokens=6)),
        (model, dict(num_beams=1, max_length=4, min_length=9)),
        (model, dict(num_beams=3, min_length=70)),  # the saved max_length, 64
        (unset, dict(num_beams=1)),  # transformers' default of 20 new tokens
        (unset, dict(num_beams=2, min_new_tokens=30)),
    ]:
        assert model.fast_search_settings(source, None, dict(settings)) is not None
        ours, said = warnings_of(type(model).generate, model, **settings)
        reference, expected = warnings_of(GenerationMixin.generate, model, **settings)
        assert torch.equal(ours, reference) and expected and said == expected, (settings, said, expected)
    assert warnings_of(type(model).generate, model, num_beams=2, max_new_tokens=5)[1] == []


def test_generate_without_a_source_mask_treats_padding_as_transformers_does():
    """transformers 5 infers no source mask from pad tokens for encoder-decoder models (4.x did)."""
    model = make_model()
    marian = to_marian(model).eval()
    source, _ = padded_batch()
    for num_beams in (1, 4):
        ours = model.generate(source, num_beams=num_beams, max_new_tokens=8)
        assert torch.equal(ours, marian.generate(source, num_beams=num_beams, max_new_tokens=8)), num_beams


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_static_cache_generate_equals_marian_and_the_dynamic_cache(implementation):
    """`cache_implementation="static"` runs transformers' loop over a fixed-size cache, with the 4D masks that
    `generate` prepares for it: Marian's tokens with its static cache, and ours with the default cache."""
    source, mask = padded_batch()
    for settings, end_bias in ((dict(num_beams=1), 1.5), (dict(num_beams=3, length_penalty=0.6), 0.8),
                               (dict(do_sample=True, top_k=5), 0.8)):
        model = make_model(output_bias=True, attn_implementation=implementation)
        with torch.no_grad():
            model.lm_head.bias[2] = end_bias  # some sentences end early, others run to the limit
        marian = to_marian(model).eval()
        settings.update(max_new_tokens=8)
        outputs = []
        for generate, extra in ((model.generate, dict(cache_implementation="static")),
                                (marian.generate, dict(cache_implementation="static")), (model.generate, {})):
            torch.manual_seed(0)
            outputs.append(generate(source, attention_mask=mask, **settings, **extra))
        assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2]), settings
        ended = (outputs[0][:, 1:] == 2).any(dim=1)
        assert ended.any() and not ended.all(), settings


def test_the_old_cache_name_warns_in_eager_and_compiles_in_one_graph():
    """`past_key_values=` (transformers 5.24 renamed it `cache`) warns as the library's models do; under
    torch.compile the warning broke the forward's graph (dynamo cannot trace `warnings.warn`)."""
    from modeling_seq2seq.modeling_seq2seq import CACHE_FIELD, resolve_cache

    cache = torch.ones(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_cache(None, cache) is cache
    assert [str(w.message) for w in caught] == (
        ["`past_key_values` is deprecated: use `cache` instead."] if CACHE_FIELD == "cache" else [])
    torch._dynamo.reset()
    assert torch.equal(torch.compile(resolve_cache, fullgraph=True, backend="eager")(None, cache), cache)


def test_static_cache_and_4d_masks_in_forward_equal_the_dynamic_cache():
    model = make_model()
    source, mask = padded_batch()
    target = torch.randint(4, VOCAB, (4, 6))
    target_mask = torch.ones_like(target)
    target_mask[1, 2] = 0
    with torch.no_grad():
        full = model(input_ids=source, attention_mask=mask, decoder_input_ids=target,
                     decoder_attention_mask=target_mask).logits
        # 4D masks (batch, 1, queries, keys), boolean or additive, are used as given, as in transformers' models.
        allowed = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None] & target_mask.bool()[:, None, None, :]
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        for mask_4d in (allowed, allowed.long(), additive):
            logits = model(input_ids=source, attention_mask=mask, decoder_input_ids=target,
                           decoder_attention_mask=mask_4d).logits
            torch.testing.assert_close(logits, full, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match=r"4D `decoder_attention_mask` has shape \(4, 1, 6, 5\)"):
            model(input_ids=source, attention_mask=mask, decoder_input_ids=target, decoder_attention_mask=allowed[..., :5])

        encoder_outputs = model.get_encoder()(input_ids=source, attention_mask=mask)
        cache = EncoderDecoderCache(StaticCache(config=model.config, max_cache_len=10),
                                    StaticCache(config=model.config, max_cache_len=source.shape[1]))
        steps = []
        for t in range(6):
            out = model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=target[:, t : t + 1],
                        decoder_attention_mask=target_mask[:, : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_generate_makes_the_forward_calls_that_hooks_and_exporters_watch():
    """The fast search never calls `forward`; where something watches those calls (a hook, or a `forward` replaced
    on the instance, as accelerate and transformers' exporters do), `generate` runs transformers' loop instead."""
    model = make_model()
    source, mask = padded_batch()
    settings = dict(num_beams=2, max_new_tokens=5, min_new_tokens=5)
    expected = model.generate(source, attention_mask=mask, **settings)
    calls = []
    for module in (model, model.model.decoder):
        handle = module.register_forward_pre_hook(lambda *args: calls.append(1))
        assert torch.equal(model.generate(source, attention_mask=mask, **settings), expected)
        assert len(calls) == 5  # one prefill and four decode steps
        handle.remove()
        calls.clear()
    original = model.forward
    model.forward = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    assert torch.equal(model.generate(source, attention_mask=mask, **settings), expected) and len(calls) == 5
    del model.forward
    assert model.fast_search_settings(source, None, dict(settings)) is not None  # nothing watches any more


# --- Training --------------------------------------------------------------------------------------------------------


def test_loss_is_cross_entropy_over_shifted_labels_with_label_smoothing():
    model = make_model(label_smoothing=0.1)
    source, mask = padded_batch()
    labels = torch.randint(4, VOCAB, (4, 6))
    labels[0, 4:] = -100
    with torch.no_grad():
        out = model(input_ids=source, attention_mask=mask, labels=labels)
        decoder_input_ids = torch.cat([torch.full((4, 1), model.config.decoder_start_token_id), labels[:, :-1]], 1)
        decoder_input_ids[decoder_input_ids == -100] = model.config.pad_token_id
        logits = model(input_ids=source, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits.double()
    # Float64 recomputation of label-smoothed cross-entropy: (1 - eps) * NLL + eps * mean over the vocabulary.
    log_probs = logits.log_softmax(-1)
    keep = labels != -100
    nll = -log_probs[keep].gather(-1, labels[keep][:, None]).squeeze(-1)
    smooth = -log_probs[keep].mean(-1)
    expected = (0.9 * nll + 0.1 * smooth).mean()
    assert abs(out.loss.item() - expected.item()) < 1e-5
    assert torch.allclose(out.logits.double(), logits, atol=1e-5)


@pytest.mark.parametrize("backward", ["one pass", "per-position weight"])
@pytest.mark.parametrize("scale", [3.0, 60.0])
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.4])
def test_label_smoothed_loss_and_gradient_equal_a_float64_recomputation(epsilon, scale, backward, monkeypatch):
    """Also at logits large enough that most probabilities underflow (the log-normaliser is taken from the largest),
    through both ways the backward forms the gradient (CPU eager: one pass with a scalar weight; elsewhere a
    per-position weight)."""
    if backward == "per-position weight":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    logits = (scale * torch.randn(12, 37)).requires_grad_()
    labels = torch.randint(0, 37, (12,))
    labels[[2, 7]] = -100
    loss = LabelSmoothedCrossEntropy.apply(logits, labels, epsilon)
    (2 * loss).backward()
    reference_logits = logits.detach().double().requires_grad_()
    log_probs, keep = reference_logits.log_softmax(-1)[labels != -100], labels[labels != -100]
    nll, smooth = -log_probs.gather(-1, keep[:, None]).squeeze(-1), -log_probs.mean(-1)
    reference = ((1 - epsilon) * nll + epsilon * smooth).mean()
    (2 * reference).backward()
    assert abs(loss.item() - reference.item()) < 1e-6 * max(1.0, reference.item())
    assert torch.allclose(logits.grad.double(), reference_logits.grad, atol=1e-6)
    assert not logits.grad[[2, 7]].any()  # ignored positions get no gradient
    torch_loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=epsilon)
    assert abs(loss.item() - torch_loss.item()) < 1e-6 * max(1.0, reference.item())

    logits.grad = None  # no labelled position: the loss is NaN and the gradient zero, as torch's
    loss = LabelSmoothedCrossEntropy.apply(logits, torch.full((12,), -100), epsilon)
    loss.backward()
    assert loss.isnan() and torch.count_nonzero(logits.grad) == 0


def lookup_backward_nodes(model, **inputs):
    """Run a forward; return the output and the names of the backward nodes of the embedding lookups it made."""
    names = []

    def record(module, args, output):  # output = lookup * scale: its grad_fn's input is the lookup's backward node
        if output.grad_fn is not None:
            names.append(type(output.grad_fn.next_functions[0][0]).__name__)

    handle = model.get_input_embeddings().register_forward_hook(record)
    try:
        output = model(**inputs)
    finally:
        handle.remove()
    return output, names


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn products", "mkl products"])
def test_the_tied_matrixs_gradient_is_gathered_in_one_buffer_and_equals_marians(onednn, monkeypatch):
    """In CPU training of the tied model, the lookups add their rows into the output projection's d/dW
    (`TiedGradient`). The shared matrix's gradient equals MarianMTModel's however the graph is used: one backward,
    two forwards summed, a graph backpropagated twice, `torch.autograd.grad`, gradients accumulated over calls, and
    a loss that does not use the logits (where the lookups fall back to their own dense gradients)."""
    monkeypatch.setattr(modeling_seq2seq, "ONEDNN_PRODUCTS", onednn)
    source, mask = padded_batch()
    labels = torch.randint(4, VOCAB, (4, 6))
    labels[0, -2:] = -100
    inputs = dict(input_ids=source, attention_mask=mask, labels=labels)
    other = dict(input_ids=source.flip(0), attention_mask=mask.flip(0), labels=labels.roll(1, 0))

    def encoder_loss(model, batch):  # every position, padding included
        return model(**batch).encoder_last_hidden_state.square().sum()

    def use(model, how):
        weight = model.get_input_embeddings().weight
        if how == "one backward":
            model(**inputs).loss.backward()
        elif how == "two forwards summed":
            (model(**inputs).loss + model(**other).loss).backward()
        elif how == "backward twice":
            loss = model(**inputs).loss
            loss.backward(retain_graph=True)
            loss.backward()
        elif how == "autograd.grad":
            return torch.autograd.grad(model(**inputs).loss, [weight])[0]
        elif how == "accumulated":
            model(**inputs).loss.backward()
            model(**other).loss.backward()
        elif how == "logits unused":
            encoder_loss(model, inputs).backward()
        elif how == "logits and encoder":
            (model(**inputs).loss + encoder_loss(model, other)).backward()
        elif how == "graph in parts":  # the projection's backward runs alone first, then the encoder's lookup alone
            output = model(**inputs)
            torch.autograd.grad(output.loss, [model.get_decoder().layers[-1].final_layer_norm.weight],
                                retain_graph=True)
            (output.encoder_last_hidden_state * mask[..., None]).square().sum().backward()
        elif how == "double backward":  # eager attention: SDPA's CPU kernel has no second derivative
            model.config._attn_implementation = "eager"
            logits = model(input_ids=source, attention_mask=mask, decoder_input_ids=labels.clamp(min=4)).logits
            gradient = torch.autograd.grad(logits.log_softmax(-1).mean(), [weight], create_graph=True)[0]
            gradient.square().sum().backward()
        return weight.grad

    for how in ("one backward", "two forwards summed", "backward twice", "autograd.grad", "accumulated",
                "logits unused", "logits and encoder", "graph in parts", "double backward"):
        model = make_model(dropout=0.0).train()
        marian = to_marian(model).train()
        gradient, reference = use(model, how), use(marian, how)
        assert gradient.layout == torch.strided and gradient.shape == reference.shape, how
        assert torch.allclose(gradient, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item()), how
        assert tied_gradient.get() is None
    torch.optim.Adam(model.parameters(), fused=True).step()

    model = make_model(dropout=0.0).train()
    assert lookup_backward_nodes(model, **inputs)[1] == ["TiedLookupBackward"] * 2
    # Elsewhere autograd's own lookups: evaluation, the model without its projection, untied weights.
    assert lookup_backward_nodes(model.eval(), **inputs)[1] == ["EmbeddingBackward0"] * 2
    plain = dict(input_ids=source, decoder_input_ids=labels.clamp(0))
    assert lookup_backward_nodes(model.model.train(), **plain)[1] == ["EmbeddingBackward0"] * 2
    untied = make_model(dropout=0.0, tie_word_embeddings=False).train()
    assert untied.lm_head.weight is not untied.model.shared.weight
    assert lookup_backward_nodes(untied, **inputs)[1] == ["EmbeddingBackward0"] * 2
    with pytest.raises(ValueError, match="decoder_input_ids"):  # the setting is reset when the forward fails
        model.train()(**inputs, decoder_input_ids=labels.clamp(0) + VOCAB)
    assert tied_gradient.get() is None
    with pytest.raises(RuntimeError, match="no second derivative"):  # rather than a silently incomplete one
        torch.autograd.grad(model(**inputs).loss, [model.model.shared.weight], create_graph=True)


def test_banned_tokens_outside_the_vocabulary_get_transformers_error_from_generate():
    """The fast search leaves a `bad_words_ids` entry outside [0, vocab_size) to transformers, whose check names it
    (the fast path indexed out of range, or banned nothing for a negative id)."""
    model = make_model()
    source, mask = padded_batch()
    for banned, message in (([[VOCAB + 10]], r"vocabulary size is 64, but the following tokens were being biased"),
                            ([[-3]], r"has to be a list of positive integers")):
        for num_beams in (1, 3):
            with pytest.raises(ValueError, match=message):
                model.generate(source, attention_mask=mask, bad_words_ids=banned, num_beams=num_beams, max_new_tokens=4)


def test_odd_generate_arguments_give_marians_tokens_or_its_error():
    """Arguments the fast search used to take its own way: a banned end of sentence (transformers drops it from the
    list; the search never ended), ids that are negative, True or a tensor (used as Python indices), an empty ban
    list, and masks of 2s, halves or -1s (transformers attends wherever the mask is not 0); then ban lists with an
    empty or a tuple entry, no length penalty, no beam count, and counts of numpy's or a tensor's integer type
    (refused as not integers). Each now gives what MarianMTModel with the same weights gives: the same tokens, or
    the same error."""
    model = make_model()
    marian = to_marian(model).eval()
    source, mask = padded_batch()

    def outcome(network, options):
        options = dict(options)
        try:
            return network.generate(source, attention_mask=options.pop("attention_mask", mask), max_new_tokens=6,
                                    **options).tolist()
        except (ValueError, TypeError, IndexError) as error:
            return type(error).__name__, str(error)

    eos = model.config.eos_token_id
    cases = [dict(bad_words_ids=[[eos]]), dict(bad_words_ids=[[token] for token in range(VOCAB)]),
             dict(bad_words_ids=[]), dict(forced_eos_token_id=-1), dict(forced_eos_token_id=True), dict(pad_token_id=-1),
             dict(eos_token_id=torch.tensor([eos])), dict(attention_mask=mask * 2), dict(attention_mask=mask * 0.5),
             dict(attention_mask=-mask), dict(attention_mask=mask.bool()),
             dict(bad_words_ids=[[5]], eos_token_id=torch.tensor([eos, 3])),
             # An empty entry bans nothing (the fast search raised IndexError); tuples and a missing length penalty
             # are transformers' errors (the fast search took them); counts of numpy's or a tensor's integer type.
             dict(bad_words_ids=[[]]), dict(bad_words_ids=[[5], []]), dict(bad_words_ids=[(5,)]),
             dict(length_penalty=None), dict(num_return_sequences=np.int64(1)), dict(min_new_tokens=np.int64(2))]
    for options in cases:
        for num_beams in (1, 3, np.int64(3), torch.tensor(3), None):
            ours, theirs = outcome(model, {**options, "num_beams": num_beams}), outcome(marian, {**options, "num_beams": num_beams})
            assert ours == theirs, (options, num_beams, ours, theirs)
    assert outcome(model, cases[0]) == outcome(model, {}), "a banned end of sentence is no ban"
    assert isinstance(outcome(model, dict(forced_eos_token_id=-1)), tuple), "an error, not a sequence ending in the last id"


def test_labels_and_decoder_inputs_of_different_lengths_are_named():
    """Marian fails inside cross-entropy ("Expected input batch_size (8) to match target batch_size (24)"), and ours
    failed inside the loss ("Size does not match at dimension 0"): the error now names the two arguments."""
    model = make_model()
    source, mask = padded_batch()
    labels = torch.randint(4, VOCAB, (4, 6))
    for decoder in (dict(decoder_input_ids=labels[:, :2]), dict(decoder_inputs_embeds=torch.zeros(4, 5, 32))):
        with pytest.raises(ValueError, match=r"`labels` \(4, 6\) and the decoder's inputs \(4, \d\) must have the same"):
            model(input_ids=source, attention_mask=mask, labels=labels, **decoder)


def test_the_padding_token_gets_no_gradient_from_the_lookups_as_in_marian():
    """As MarianMTModel's embedding (`padding_idx`), the lookups give the padding token's row no gradient; there it
    matters in an OPUS-MT model, whose decoder starts from the padding token. Checked against Marian with that
    setting, through the gathered gradient (training), autograd's own lookups (the base model) and a loss over the
    encoder's padding positions."""
    source, mask = padded_batch()
    labels = torch.randint(4, VOCAB, (4, 6))
    pad = 0
    for how in ("training", "base model", "encoder padding"):
        model = make_model(dropout=0.0, decoder_start_token_id=pad).train()
        marian = to_marian(model).train()
        assert marian.config.decoder_start_token_id == pad == marian.model.shared.padding_idx
        for network in (model, marian):
            if how == "training":
                network(input_ids=source, attention_mask=mask, labels=labels).loss.backward()
            elif how == "base model":
                network.model(input_ids=source, attention_mask=mask, decoder_input_ids=network
                              .prepare_decoder_input_ids_from_labels(labels)).last_hidden_state.square().sum().backward()
            else:
                network(input_ids=source, labels=labels).encoder_last_hidden_state.square().sum().backward()
        gradient, reference = model.model.shared.weight.grad, marian.model.shared.weight.grad
        assert torch.allclose(gradient, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item()), how
        if how != "training":  # no projection there: the padding row's gradient is exactly zero
            assert torch.count_nonzero(gradient[pad]) == 0 and torch.count_nonzero(gradient[4:]) > 0, how


def trainer_rows(source, mask):
    """A padded batch as a Trainer's dataset: one dict per row, labels -100 at the padding."""
    labels = source.roll(1, dims=1).masked_fill(mask == 0, -100)
    return [dict(input_ids=s, attention_mask=m, labels=t) for s, m, t in zip(source, mask, labels)]


def test_transformers_trainer_finds_the_labels_and_reports_marians_eval_loss(tmp_path):
    """transformers' Trainer takes every `forward` argument with "label" in its name for a label column, and counts a
    batch as labelled only when all are there: a second such argument left every evaluation without a loss (and
    `compute_metrics` uncalled). Same label names as Marian, and its eval loss."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
    from transformers.utils import find_labels

    model = make_model(dropout=0.0, label_smoothing=0.0)
    marian = to_marian(model).eval()
    assert find_labels(type(model)) == find_labels(type(marian)) == ["labels"]
    rows = trainer_rows(*padded_batch())
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=2)
    ours, theirs = (Seq2SeqTrainer(model=side, args=args, eval_dataset=rows).evaluate() for side in (model, marian))
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)


def test_transformers_trainer_with_gradient_accumulation_takes_the_mean_over_all_the_updates_tokens(tmp_path):
    """Under accumulation transformers' Trainer passes `num_items_in_batch` (the update's labelled tokens) to a model
    that takes `**kwargs` and then leaves the loss unscaled: 2 micro-batches of 2 must make the update that 1 batch
    of 4 makes (plain SGD, so the step is the gradient), with rows of different label counts. (MarianMTModel ignores
    the count, and steps 2x too far here.)"""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    rows = trainer_rows(*padded_batch(batch=8))
    runs = {}
    for batch, accumulation in ((4, 1), (2, 2)):
        model = make_model(dropout=0.0)
        args = Seq2SeqTrainingArguments(
            output_dir=str(tmp_path / f"{batch}x{accumulation}"), use_cpu=True, report_to=[], optim="sgd",
            learning_rate=0.5, lr_scheduler_type="constant", max_steps=2, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, logging_steps=1, save_strategy="no", seed=0)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        runs[batch] = ([entry["loss"] for entry in trainer.state.log_history if "loss" in entry], model.state_dict())
    (losses_4, weights_4), (losses_2, weights_2) = runs[4], runs[2]
    assert losses_2 == pytest.approx(losses_4, rel=1e-5)
    for name, tensor in weights_4.items():
        torch.testing.assert_close(weights_2[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_projecting_scored_positions_only_gives_marians_loss_and_gradients_and_its_logits_at_those_positions():
    """`project_scored_positions_only=True` (what the training loop passes) projects only the labelled positions: same
    loss and gradients as MarianMTModel's full projection, and its logits at those positions."""
    from modeling_seq2seq.training import compute_loss

    source, mask = padded_batch()
    labels = torch.randint(4, VOCAB, (4, 6))
    labels[0, -2:] = labels[2, -3:] = -100
    kept = labels != -100
    model = make_model(dropout=0.0).train()
    marian = to_marian(model).train()
    output = model(input_ids=source, attention_mask=mask, labels=labels, project_scored_positions_only=True)
    reference = marian(input_ids=source, attention_mask=mask, labels=labels)
    assert output.logits.shape == (int(kept.sum()), VOCAB)
    torch.testing.assert_close(output.logits, reference.logits[kept], rtol=1e-5, atol=1e-5)
    assert abs(output.loss.item() - reference.loss.item()) < 1e-5
    output.loss.backward()
    reference.loss.backward()
    pairs = ((model.model.shared.weight, marian.model.shared.weight),
             (model.model.decoder.layers[-1].feed_forward.fc2.weight, marian.model.decoder.layers[-1].fc2.weight))
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6 * theirs.grad.abs().max().item())
    # Without labels, or without the flag, every position is projected.
    assert model(input_ids=source, attention_mask=mask, decoder_input_ids=labels.clamp(4),
                 project_scored_positions_only=True).logits.shape == (4, 6, VOCAB)
    assert model(input_ids=source, attention_mask=mask, labels=labels).logits.shape == (4, 6, VOCAB)
    # The training loop's loss projects the labelled positions only.
    rows = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        loss = compute_loss(model, dict(input_ids=source, attention_mask=mask, labels=labels))
    finally:
        handle.remove()
    assert rows == [int(kept.sum())] and abs(loss.item() - reference.loss.item()) < 1e-5


def test_gradient_reaches_every_parameter():
    model = make_model().train()
    source, mask = padded_batch()
    model(input_ids=source, attention_mask=mask, labels=torch.randint(4, VOCAB, (4, 6))).loss.backward()
    no_gradient = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_gradient


@pytest.mark.parametrize(
    "settings",
    [
        dict(dropout=0.0),
        dict(dropout=0.0, d_model=512, encoder_ffn_dim=1024, decoder_ffn_dim=1024),  # wide: OneDNNLinear
        dict(dropout=0.3, activation_dropout=0.2, attention_dropout=0.1, attn_implementation="eager"),  # same masks
    ],
)
def test_gradient_checkpointing_gives_the_same_gradients(settings, onednn_products):
    source, mask = padded_batch()
    labels = torch.randint(4, VOCAB, (4, 6))
    gradients = []
    for checkpointing in (False, True):
        model = make_model(**{k: v for k, v in settings.items() if k != "attn_implementation"}).train()
        model.config._attn_implementation = settings.get("attn_implementation", model.config._attn_implementation)
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(5)
        model(input_ids=source, attention_mask=mask, labels=labels).loss.backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)


def lowbias32_reference(values: "np.ndarray") -> "np.ndarray":
    """The hash as published, on uint32 (numpy wraps uint32 products modulo 2^32)."""
    x = values.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def test_lowbias32_on_int32_equals_the_uint32_hash():
    edges = torch.tensor([0, 1, -1, 2**31 - 1, -(2**31), 0x7FEB352D, -0x7B935975], dtype=torch.int32)
    values = torch.cat([edges, torch.randint(-(2**31), 2**31 - 1, (100_000,), dtype=torch.int32)])
    expected = lowbias32_reference(values.numpy().view(np.uint32))
    assert np.array_equal(lowbias32_(values.clone()).numpy().view(np.uint32), expected)
    assert lowbias32_reference(np.array([1], dtype=np.uint32))[0] != 1  # not the identity


@pytest.mark.parametrize("p", [0.01, 0.1, 0.3, 0.5, 0.9])  # 0.01: a 32-bit number per element; others: 16 bits
def test_dropout_mask_drops_each_element_independently_with_probability_p(p):
    torch.manual_seed(0)
    n = 1_000_000
    first, second = dropout_mask(torch.Size([n]), p, torch.float32), dropout_mask(torch.Size([n]), p, torch.float32)
    assert torch.equal(first.unique(), torch.tensor([0.0, 1 / (1 - p)]))
    dropped, dropped_next = first == 0, second == 0
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.double().mean().item() - p) < 5 * sigma
    # pairs: neighbours in one mask (consecutive counters), the same element in two masks, and a stride of 512
    pair_sigma = math.sqrt(p * p * (1 - p * p) / (n // 2))
    for a, b in ((dropped[:-1], dropped[1:]), (dropped, dropped_next), (dropped[:-512], dropped[512:])):
        assert abs((a & b).double().mean().item() - p * p) < 5 * pair_sigma


def test_a_dropout_probability_below_the_16_bit_resolution_is_not_rounded_away():
    torch.manual_seed(0)
    n = 2**22  # 16-bit halves would round p (or 1 - p) to 0; 32-bit numbers drop (or keep) ~16 of these elements
    dropped = (dropout_mask(torch.Size([n]), 2**-18, torch.float32) == 0).sum().item()
    kept = (dropout_mask(torch.Size([n]), 1 - 2**-18, torch.float32) != 0).sum().item()
    assert 4 <= dropped <= 40 and 4 <= kept <= 40
    odd = dropout_mask(torch.Size([3, 5, 7]), 0.5, torch.float64)  # an odd count: half of the last hash is unused
    assert odd.shape == (3, 5, 7) and odd.dtype == torch.float64 and set(odd.unique().tolist()) <= {0.0, 2.0}


def test_dropout_is_reproducible_from_torchs_seed_and_scales_what_it_keeps():
    x = torch.randn(64, 33, dtype=torch.float64)
    torch.manual_seed(1)
    once = apply_dropout(x, 0.25, True)
    torch.manual_seed(1)
    again, other = apply_dropout(x, 0.25, True), apply_dropout(x, 0.25, True)
    assert torch.equal(once, again) and not torch.equal(once, other)
    kept = once != 0
    assert torch.allclose(once[kept], x[kept] / 0.75, rtol=1e-15, atol=0)
    assert apply_dropout(x, 0.25, False) is x
    residual = torch.randn_like(x)
    torch.manual_seed(1)
    assert torch.allclose(add_dropout(residual, x, 0.25, True), residual + once, rtol=0, atol=1e-15)
    assert torch.equal(apply_dropout(x, 1.0, True), torch.zeros_like(x))  # p = 1: torch's own

    class Sublayer(torch.nn.Module):
        def forward(self, residual, output):
            return add_dropout(residual, apply_dropout(output, 0.1, True), 0.1, True)

    traced = torch.fx.symbolic_trace(Sublayer())  # a tracer's proxies get torch's dropout, which it records
    assert sum(node.target is torch.nn.functional.dropout for node in traced.graph.nodes) == 2


def test_tiny_model_overfits_one_batch():
    model = make_model(dropout=0.0).train()
    source, mask = padded_batch(batch=8, length=8)
    labels = torch.randint(4, VOCAB, (8, 6))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    for _ in range(200):
        loss = model(input_ids=source, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05


# --- Embeddings, weights and save/load ------------------------------------------------------------------------------


def test_embeddings_are_shared_scaled_and_tied():
    model = make_model()
    shared = model.get_input_embeddings()
    assert model.get_encoder().embed_tokens is shared and model.get_decoder().embed_tokens is shared
    assert model.get_output_embeddings().weight is shared.weight
    ids = torch.tensor([[5, 6]])
    assert torch.allclose(shared(ids), shared.weight[ids] * math.sqrt(model.config.d_model))


def test_untied_output_projection_keeps_source_and_target_shared(tmp_path):
    model = make_model(tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.shared.weight
    assert model.get_encoder().embed_tokens is model.get_decoder().embed_tokens
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(loaded.lm_head.weight, loaded.model.shared.weight)


def test_save_and_load_round_trip_with_safetensors(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, output_loading_info=True, use_safetensors=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert isinstance(loaded, Seq2SeqTransformerForConditionalGeneration)
    assert loaded.lm_head.weight is loaded.model.shared.weight
    source, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(
            loaded.eval()(input_ids=source, attention_mask=mask, decoder_input_ids=source).logits,
            model(input_ids=source, attention_mask=mask, decoder_input_ids=source).logits,
        )
    assert loaded.generation_config.num_beams == 4


def test_auto_classes_are_registered(tmp_path):
    config = tiny_config()
    assert isinstance(AutoConfig.for_model("seq2seq_transformer", d_model=64), Seq2SeqTransformerConfig)
    assert isinstance(AutoModel.from_config(config), Seq2SeqTransformerModel)
    assert isinstance(AutoModelForSeq2SeqLM.from_config(config), Seq2SeqTransformerForConditionalGeneration)
    make_model().save_pretrained(tmp_path)
    assert isinstance(AutoModel.from_pretrained(tmp_path), Seq2SeqTransformerModel)


def test_resize_token_embeddings_keeps_the_tie():
    model = make_model()
    model.resize_token_embeddings(VOCAB + 6)
    assert model.config.vocab_size == VOCAB + 6
    assert model.lm_head.weight is model.model.shared.weight
    assert model.get_encoder().embed_tokens is model.get_input_embeddings()
    source, mask = padded_batch()
    assert model(input_ids=source, attention_mask=mask, decoder_input_ids=source).logits.shape[-1] == VOCAB + 6


def test_hidden_states_and_attentions_are_returned():
    model = make_model()
    model.config._attn_implementation = "sdpa"
    source, mask = padded_batch()
    out = model(input_ids=source, attention_mask=mask, decoder_input_ids=source[:, :5],
                output_hidden_states=True, output_attentions=True)
    assert len(out.encoder_hidden_states) == 3 and len(out.decoder_hidden_states) == 3
    assert out.cross_attentions[0].shape == (4, 4, 5, source.shape[1])
    # Attention weights are distributions over the source, and padding gets none of the mass.
    assert torch.allclose(out.cross_attentions[-1].sum(-1), torch.ones(4, 4, 5), atol=1e-5)
    assert out.cross_attentions[-1][1, :, :, mask[1] == 0].abs().max() < 1e-6


def test_pre_layer_norm_option_builds_and_learns():
    model = make_model(layer_norm_position="pre").train()
    assert model.model.encoder.layer_norm is not None
    source, mask = padded_batch()
    labels = torch.randint(4, VOCAB, (4, 6))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = model(input_ids=source, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_bf16_on_cpu_is_finite_even_for_fully_padded_rows():
    model = make_model().to(torch.bfloat16)
    source, mask = padded_batch()
    mask[3] = 0  # a row that is all padding
    with torch.no_grad():
        logits = model(input_ids=source, attention_mask=mask, decoder_input_ids=source[:, :4]).logits
    assert torch.isfinite(logits).all()


# --- Configuration ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("encoder_attention_heads", 5),
        ("d_model", 0),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("activation_function", "tanh"),
        ("positional_encoding_layout", "rotary"),
        ("layer_norm_position", "sandwich"),
        ("encoder_layers", 2.5),
        ("vocab_size", "big"),
        ("pad_token_id", 10_000),
    ],
)
def test_config_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r}".replace("(", r"\(").replace(".", r"\.")):
        tiny_config(**{field: value})


def test_presets_match_the_paper_sizes():
    """Table 3: base about 65M and big about 213M parameters with a 37,000-token shared vocabulary."""
    sizes = {}
    for name in ("base", "big"):
        config = load_preset(name)
        assert config.vocab_size == 37000
        with torch.device("meta"):
            model = Seq2SeqTransformerForConditionalGeneration(config)
        sizes[name] = sum(p.numel() for p in model.parameters())
    assert abs(sizes["base"] - 65e6) / 65e6 < 0.05, sizes
    assert abs(sizes["big"] - 213e6) / 213e6 < 0.05, sizes
    base, big = load_preset("base"), load_preset("big")
    assert (base.d_model, base.encoder_ffn_dim, base.encoder_attention_heads, base.dropout) == (512, 2048, 8, 0.1)
    assert (big.d_model, big.encoder_ffn_dim, big.encoder_attention_heads, big.dropout) == (1024, 4096, 16, 0.3)
    assert base.encoder_layers == base.decoder_layers == big.encoder_layers == 6



# Table 3 of the paper: (N, d_model, d_ff, h, P_drop, eps_ls) of the base and big models.
TABLE_3 = {"base": (6, 512, 2048, 8, 0.1, 0.1), "big": (6, 1024, 4096, 16, 0.3, 0.1)}


def test_presets_are_table_3_in_both_stacks_and_the_default_config_is_the_base_model():
    """Every number of Table 3, in the encoder and the decoder (the parameter count above cannot see a head count
    or a label smoothing); the config's defaults are the base model's, label smoothing aside (0, documented)."""
    for name, (layers, d_model, d_ff, heads, dropout, smoothing) in TABLE_3.items():
        c = load_preset(name)
        assert (c.encoder_layers, c.decoder_layers, c.d_model) == (layers, layers, d_model), name
        assert (c.encoder_ffn_dim, c.decoder_ffn_dim) == (d_ff, d_ff), name
        assert (c.encoder_attention_heads, c.decoder_attention_heads) == (heads, heads), name
        assert (c.dropout, c.label_smoothing) == (dropout, smoothing), name
    layers, d_model, d_ff, heads, dropout, _ = TABLE_3["base"]
    c = Seq2SeqTransformerConfig()
    assert (c.encoder_layers, c.decoder_layers, c.d_model, c.encoder_ffn_dim, c.decoder_ffn_dim,
            c.encoder_attention_heads, c.decoder_attention_heads, c.dropout) == (
        layers, layers, d_model, d_ff, d_ff, heads, heads, dropout)
    assert c.label_smoothing == 0.0


@pytest.mark.parametrize("field", ["pad_token_id", "bos_token_id", "decoder_start_token_id", "eos_token_id"])
def test_a_token_id_equal_to_the_vocabulary_size_is_refused(field):
    with pytest.raises(ValueError, match=rf"{field}={VOCAB}"):
        tiny_config(**{field: VOCAB})
    tiny_config(**{field: VOCAB - 1})  # the last id is fine


def test_preset_file_with_unknown_field_is_rejected(tmp_path):
    path = tmp_path / "preset.json"
    path.write_text('{"d_model": 64, "encoder_attention_heads": 4, "decoder_attention_heads": 4, "n_layerz": 3}')
    with pytest.raises(ValueError, match=r"preset\.json: unknown field\(s\) n_layerz"):
        load_preset(path)
    path.write_text('{"d_model": 60, "encoder_attention_heads": 8}')
    with pytest.raises(ValueError, match=r"preset\.json: .*encoder_attention_heads=8"):
        load_preset(path)


def test_convert_script_round_trip(tmp_path, capsys, unusual_permissions):
    """scripts/convert_marian.py: ours -> Marian folder -> ours gives the same logits."""
    import runpy

    convert = runpy.run_path("scripts/convert_marian.py")["main"]
    model = make_model(vocab_size=300)  # the tokenizer's size (a smaller model is refused)
    model.save_pretrained(tmp_path / "ours")
    save_tokenizer(train_tokenizer(["one two three"] * 10, vocab_size=300), tmp_path / "ours")
    assert convert(["--to", "marian", "--input", str(tmp_path / "ours"), "--output_dir", str(tmp_path / "marian")]) == 0
    assert convert(["--to", "ours", "--input", str(tmp_path / "marian"), "--output_dir", str(tmp_path / "back")]) == 0
    # Never inside an input checkpoint, which rotation deletes with everything in it (it was written there).
    checkpoint = tmp_path / "run" / "checkpoint-20"
    shutil.copytree(tmp_path / "ours", checkpoint)
    capsys.readouterr()
    assert convert(["--to", "marian", "--input", str(checkpoint), "--output_dir", str(checkpoint / "m")]) == 1
    assert f"lies inside the checkpoint {str(checkpoint)!r}" in capsys.readouterr().err and not (checkpoint / "m").exists()
    for folder in ("marian", "back"):  # as save_tokenizer writes it, which transformers 4.57 loads too
        config = json.loads((tmp_path / folder / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast", folder
    back = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "back").eval()
    # the converted folders and their files (ours/ is save_pretrained's own)
    assert [path for path in unusual_permissions(tmp_path) if not path.startswith(("ours", "run"))] == []
    source, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(back(input_ids=source, attention_mask=mask, decoder_input_ids=source).logits,
                           model(input_ids=source, attention_mask=mask, decoder_input_ids=source).logits)
    capsys.readouterr()
    # Never into a non-empty folder; never random weights: the wrong direction (transformers would only warn and
    # initialise every weight afresh), or weights missing from the file.
    partial = tmp_path / "partial"
    model.save_pretrained(partial)
    weights = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".decoder." not in k}, str(partial / "model.safetensors"), metadata={"format": "pt"})
    # A Marian folder damaged in the ways every loader of ours refuses, and its tokenizer: the conversion refuses them
    # too, naming the file, where it used to convert them (or fail with a bare AttributeError or torch's error).
    marian_weights = load_file(str(tmp_path / "marian" / "model.safetensors"))
    marian_config = json.loads((tmp_path / "marian" / "config.json").read_text())
    damaged = {}
    for name, change in [("listed", "config"), ("nan", "weights"), ("extra", "weights"), ("negative", "config"),
                         ("bad_tokenizer", "tokenizer"), ("big_tokenizer", "tokenizer")]:
        folder = damaged[name] = tmp_path / f"marian_{name}"
        shutil.copytree(tmp_path / "marian", folder)
    (damaged["listed"] / "config.json").write_text("[1, 2, 3]")
    (damaged["negative"] / "config.json").write_text(json.dumps({**marian_config, "d_model": -128}))
    first = sorted(marian_weights)[0]
    save_file({**marian_weights, first: torch.full_like(marian_weights[first], float("nan"))},
              str(damaged["nan"] / "model.safetensors"), metadata={"format": "pt"})
    save_file({**marian_weights, "model.extra.weight": torch.zeros(2)}, str(damaged["extra"] / "model.safetensors"),
              metadata={"format": "pt"})
    (damaged["bad_tokenizer"] / "tokenizer.json").write_text("{")
    big = load_tokenizer(tmp_path / "marian")
    big.add_tokens([f"extra{i}" for i in range(model.config.vocab_size)])
    save_tokenizer(big, damaged["big_tokenizer"])
    for name, message in [
        ("listed", f"{damaged['listed'] / 'config.json'}: expected a JSON object (a JSON model config), got list"),
        ("nan", f"{damaged['nan']}: the saved weights hold NaN or infinite values"),
        ("extra", "model.extra.weight); config.json and the weights do not belong together"),
        ("negative", f"{damaged['negative'] / 'config.json'}: the model it describes cannot be built"),
        ("bad_tokenizer", f"{damaged['bad_tokenizer']}: its tokenizer files do not load"),
        ("big_tokenizer", f"{damaged['big_tokenizer']}: its tokenizer has {len(big)} tokens (ids up to {len(big) - 1}), "
                         "but the model only"),
    ]:
        assert convert(["--to", "ours", "--input", str(damaged[name]), "--output_dir", str(tmp_path / "x")]) == 1
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error, (name, error)
    for args, message in [
        (["--to", "ours", "--input", str(tmp_path / "marian"), "--output_dir", str(tmp_path / "back")],
         f"--output_dir {tmp_path / 'back'} exists and is not empty; choose a new --output_dir."),
        (["--to", "ours", "--input", str(partial), "--output_dir", str(tmp_path / "back")],  # before any loading
         f"--output_dir {tmp_path / 'back'} exists and is not empty; choose a new --output_dir."),
        (["--to", "marian", "--input", str(tmp_path / "marian"), "--output_dir", str(tmp_path / "x")],
         "its config.json says model_type 'marian', not 'seq2seq_transformer'"),
        (["--to", "marian", "--input", str(partial), "--output_dir", str(tmp_path / "x")],
         "refusing to run partly random weights"),
        (["--to", "marian", "--input", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "x")], "no such model folder"),
        (["--to", "marian", "--input", str(tmp_path), "--output_dir", str(tmp_path / "x")], "has no config.json"),
        (["--to", "marian", "--input", str(partial), "--output_dir", str(tmp_path / "no" / "x")],
         f"its folder '{tmp_path / 'no'}' does not exist"),
    ]:
        assert convert(args) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit):
        convert(["--to", "marian", "--input", str(tmp_path / "ours"), "--output_dir", str(tmp_path / "file")])
    assert "is a file, not a folder" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("shape", ["paper", "pre-norm", "gelu", "silu", "swish pre-norm", "wide amd", "wide intel"])
def test_scripted_decode_step_computes_what_the_python_step_does(shape, monkeypatch):
    """The TorchScript step (`decode_step_layers`) against the step run op by op: the same logits at every step, for
    every layer norm position and activation it takes, through beam reorders and sentences leaving the batch (6, 4,
    then 2 rows), and with oneDNN's products under either CPU's settings for few rows (`wide`: padded, or 2 rows by
    `F.linear` and none padded). Then whole searches against transformers' own."""
    if shape.startswith("wide"):
        use_few_rows_settings(monkeypatch, shape.split()[1])
    overrides = {
        "paper": {}, "pre-norm": dict(layer_norm_position="pre"), "gelu": dict(activation_function="gelu"),
        "silu": dict(activation_function="silu"),
        "swish pre-norm": dict(activation_function="swish", layer_norm_position="pre"),
    }
    model = wide_model() if shape.startswith("wide") else make_model(1, output_bias=True, **overrides[shape])
    vocab = model.config.vocab_size
    source, mask = padded_batch(seed=2, batch=3, vocab=vocab)
    beams = 2
    with torch.no_grad():
        scripted, python = (IncrementalDecoder(model, source, mask, beams) for _ in range(2))
        python.script = None
        assert scripted.script is not None
        tokens = torch.arange(6) + 4
        for step in range(7):
            expected = python.step(tokens)
            torch.testing.assert_close(scripted.step(tokens), expected, rtol=1e-5, atol=1e-5)
            tokens = expected.argmax(dim=-1)
            if step == 2:  # a beam reorder: every row continues from the first beam of its sentence
                for decoder in (scripted, python):
                    decoder.reorder(torch.tensor([0, 0, 2, 2, 4, 4]))
            if step == 3:  # the second sentence is done
                for decoder in (scripted, python):
                    decoder.keep_sentences(torch.tensor([0, 2]))
                    decoder.reorder(torch.tensor([0, 1, 4, 5]))
                tokens = tokens[[0, 1, 4, 5]]
            if step == 4:  # only the first sentence is left
                for decoder in (scripted, python):
                    decoder.keep_sentences(torch.tensor([0]))
                    decoder.reorder(torch.tensor([0, 1]))
                tokens = tokens[[0, 1]]
    for settings in (dict(num_beams=1), dict(num_beams=4, length_penalty=0.6)):
        settings.update(max_new_tokens=8)
        reference = GenerationMixin.generate(model, source, attention_mask=mask, **settings)
        assert torch.equal(model.generate(source, attention_mask=mask, **settings), reference), settings


def test_decode_step_runs_op_by_op_where_torchscript_would_skip_something():
    """Hooks, adapters, other layer kinds, activations the script does not know, autocast, half precision and torch
    function modes keep the Python step (which honours them); so does `decode_with_torchscript = False`."""
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model()
    assert runs_scripted(model)
    layer = model.model.decoder.layers[1]
    handle = layer.final_layer_norm.register_forward_hook(lambda *args: None)
    assert not runs_scripted(model)
    handle.remove()

    class Adapter(torch.nn.Linear):
        pass

    plain = layer.feed_forward.fc2
    layer.feed_forward.fc2 = Adapter(plain.in_features, plain.out_features)
    assert not runs_scripted(model)
    layer.feed_forward.fc2 = plain
    norm = layer.cross_attn_layer_norm
    layer.cross_attn_layer_norm = torch.nn.RMSNorm(norm.normalized_shape)
    assert not runs_scripted(model)
    layer.cross_attn_layer_norm = norm
    activation = layer.feed_forward.activation
    layer.feed_forward.activation = torch.nn.Tanh()
    assert not runs_scripted(model)
    layer.feed_forward.activation = activation
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not runs_scripted(model)
    with FlopCounterMode(display=False):
        assert not runs_scripted(model)
    model.decode_with_torchscript = False
    assert not runs_scripted(model)
    del model.decode_with_torchscript
    assert runs_scripted(model)
    assert not runs_scripted(make_model(activation_function="gelu_new"))  # tanh approximation, written out
    assert not runs_scripted(make_model().to(torch.bfloat16))


@pytest.fixture
def fresh_script():
    scripted_decode_step.cache_clear()
    yield
    scripted_decode_step.cache_clear()


def test_decoding_goes_on_in_python_when_torchscript_cannot_compile(monkeypatch, fresh_script):
    """TorchScript needs the source file (a frozen app may lack it) and is deprecated: without it, a warning says
    so once, and the step runs op by op with the same outputs."""
    model = make_model(2)
    source, mask = padded_batch(seed=2)
    expected = GenerationMixin.generate(model, source, attention_mask=mask, num_beams=3, max_new_tokens=6)

    def no_source(function):
        raise OSError(f"could not get source code for {function.__name__}")

    monkeypatch.setattr(torch.jit, "script", no_source)
    with pytest.warns(RuntimeWarning, match="TorchScript could not compile the decode step .*could not get source"):
        assert not runs_scripted(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(model.generate(source, attention_mask=mask, num_beams=3, max_new_tokens=6), expected)


def test_compiling_the_decode_step_shows_no_deprecation_warning(fresh_script):
    """`torch.jit.script` warns that TorchScript is deprecated; a user's first `generate` must not show it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert scripted_decode_step() is not None
    assert not [w for w in caught if "torch.jit" in str(w.message)]


SCREEN_COPIES = ["int8", "bfloat16"]


def skip_unless_screen_kernel(model, copy, monkeypatch):
    """Skip where this CPU has no kernel for `copy`, else make greedy screens read it (int8: up to 3 rows)."""
    if copy == "int8" and not GreedyScreen.int8_kernel_fits(model.lm_head):
        pytest.skip("torch's int8 kernel is not AVX-512 code on this CPU")
    if copy == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bfloat16 kernels on this CPU")
    monkeypatch.setattr(GreedyScreen, "int8_rows", 3 if copy == "int8" else 0)


def screen_for(model, copy, monkeypatch):
    """A screen that reads the output projection's `copy`, over a stand-in for `IncrementalDecoder` whose step
    returns `hidden`."""
    skip_unless_screen_kernel(model, copy, monkeypatch)

    class Decoder:  # what the screen asks of IncrementalDecoder
        def __init__(self):
            self.model, self.linear = model, DecodeStepLinear(model, torch.device("cpu"), torch.float32)
            self.script, self.hidden = object(), None

        def step(self, tokens, project=True):
            return self.hidden

    screen = GreedyScreen.for_decoder(Decoder())
    assert screen is not None
    return screen


def screened_model(seed=0):
    """An output projection of 2^22 weights (8192 x 512), the smallest that greedy search screens in bfloat16."""
    return make_model(seed, d_model=512, encoder_ffn_dim=512, decoder_ffn_dim=512, encoder_attention_heads=8,
                      decoder_attention_heads=8, encoder_layers=1, decoder_layers=1, vocab_size=8192, output_bias=True)


@pytest.mark.parametrize("cpu", FEW_ROWS_SETTINGS)
@pytest.mark.parametrize("copy", SCREEN_COPIES)
@pytest.mark.parametrize("seed", range(3))
def test_greedy_screen_gives_transformers_tokens(seed, copy, cpu, monkeypatch):
    """Greedy search through the screen returns what transformers' greedy search returns, with the token
    suppressions it handles; the screen, reading `copy`, was used and rarely had to fall back to the full product.
    The int8 copy serves 1 to 3 rows, the bfloat16 one (here) any number, padded or not (either CPU's settings for
    few rows). The copy is looked up (and checked against the weight) once per search, not at every step; an edit
    of the weight between searches is seen."""
    use_few_rows_settings(monkeypatch, cpu)
    model = screened_model(seed)
    skip_unless_screen_kernel(model, copy, monkeypatch)
    with torch.no_grad():
        model.lm_head.bias[2] = 2.0 + seed  # end-of-sentence likely: sentences finish at different steps
    source, mask = padded_batch(seed=seed, batch=1 + (seed if copy == "int8" else 2 * seed), vocab=8192)
    fallbacks, calls = [], []
    call = GreedyScreen.__call__

    def counting(self, tokens, step, settings):
        calls.append(step)
        return call(self, tokens, step, settings)

    monkeypatch.setattr(GreedyScreen, "__call__", counting)
    monkeypatch.setattr(DecodeStepLinear, "__call__", lambda self, module, x, call=DecodeStepLinear.__call__:
                        fallbacks.append(module) or call(self, module, x))
    lookups, kept_copy = [], DecodeStepLinear.kept_copy
    monkeypatch.setattr(DecodeStepLinear, "kept_copy", lambda self, module, key, make: (
        lookups.append(key) if isinstance(key, tuple) else None) or kept_copy(self, module, key, make))
    searches = (dict(), dict(min_new_tokens=5), dict(bad_words_ids=[[5], [7]], forced_eos_token_id=2), dict())
    for number, settings in enumerate(searches):
        if number == len(searches) - 1:
            model.lm_head.weight.data[:, :7] *= -1  # through .data: the version counter does not see it
        settings.update(num_beams=1, max_new_tokens=10)
        reference = GenerationMixin.generate(model, source, attention_mask=mask, **settings)
        assert torch.equal(model.generate(source, attention_mask=mask, **settings), reference), settings
    assert calls, "the screen did not run"
    assert len(lookups) == len(searches) < len(calls)
    assert sum(module is model.lm_head for module in fallbacks) <= len(calls) // 4
    assert {key[0] for key in model._packed_decode_weights if isinstance(key, tuple)} == {copy}


@pytest.mark.parametrize("copy", SCREEN_COPIES)
def test_greedy_screen_decides_near_ties_in_float32(copy, monkeypatch):
    """Pairs of output rows closer than the screen's copy can resolve, each made the favourite of one hidden state by
    its bias: the copy's logits rank some pairs the other way round than float32 does (checked: the test is only
    meaningful if they do), yet the screen returns the float32 argmax (its first maximum on exact ties), under every
    token suppression, deciding among its candidates itself (no fall-back to the full product), and also when the
    full product runs (`max_candidates` 0)."""
    model = screened_model()
    generator = torch.Generator().manual_seed(0)
    pairs = 48
    first = torch.arange(100, 100 + 2 * pairs, 2)
    with torch.no_grad():
        weight, bias = model.lm_head.weight, model.lm_head.bias
        weight[first + 1] = weight[first] + 1e-4 * torch.randn(pairs, 512, generator=generator)
        weight[7000] = weight[first[0]]  # an exact tie with the first pair's first row: the lower index wins
        hidden = torch.randn(pairs, 512, generator=generator)
        exact = torch.nn.functional.linear(hidden, weight)
        screen = screen_for(model, copy, monkeypatch)
        rounded = torch.cat([screen.approximate_logits(hidden[row : row + 1])[0] for row in range(pairs)])
    k = torch.arange(pairs)
    exact_order = exact[k, first] > exact[k, first + 1]
    rounded_order = rounded[k, first] > rounded[k, first + 1]
    reversed_strictly = (exact_order != rounded_order) & (rounded[k, first] != rounded[k, first + 1])
    assert int(reversed_strictly.sum()) >= 3

    plain = dict(banned=[], min_new_tokens=0, eos=[2], forced_eos=None, max_new_tokens=50)
    original_bias = bias.detach().clone()
    fallbacks = []
    monkeypatch.setattr(DecodeStepLinear, "__call__", lambda self, module, x, call=DecodeStepLinear.__call__:
                        fallbacks.append(screen.max_candidates) or call(self, module, x))
    for row in range(pairs):
        screen.decoder.hidden = hidden[row : row + 1]
        with torch.no_grad():
            bias.copy_(original_bias)
            bias[torch.tensor([int(first[row]), int(first[row]) + 1, 7000])] = 20.0
        screen.largest_bias = float(bias.detach().abs().max())  # as a new search would find it
        logits = torch.nn.functional.linear(hidden[row : row + 1], weight, bias)
        for settings in (plain, dict(plain, banned=[int(first[row])]), dict(plain, min_new_tokens=9),
                         dict(plain, forced_eos=2, max_new_tokens=4)):
            expected = suppress_tokens(logits.clone(), 3, settings).argmax(dim=-1)
            for limit in (1024, 0):
                screen.max_candidates = limit
                assert torch.equal(screen(torch.zeros(1, dtype=torch.long), 3, settings), expected), (row, settings)
    assert {key[0] for key in model._packed_decode_weights if isinstance(key, tuple)} == {copy}
    assert fallbacks == [0] * pairs * 4


@pytest.mark.parametrize("copy", SCREEN_COPIES)
def test_greedy_screen_bound_holds_against_float64(copy, monkeypatch):
    """The screen's error bound, c1 |h| + c2 |a_i|, covers the distance of every approximate logit to the float64
    product: for rows of the weight that quantize badly (all zero, tiny), for hidden states of very different sizes,
    and for the worst hidden state of the row with the largest weight error (h along that error, where
    Cauchy-Schwarz is tight: there the bound is within 4x of the error in int8; in bfloat16, which bounds each
    weight's rounding by a whole unit roundoff and counts the widest row, within 8x). It stays tight enough to
    screen: few candidates, even for random hidden states, which favour no row. Rows it cannot bound tightly (a huge row; in
    int8, a row with one outlier weight) are always candidates instead of widening c1."""
    model = screened_model()
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[5, 0] = 1.0  # one outlier weight: its row's int8 scale is ~7x the others'
        weight[6] = 0.0
        weight[7] *= 1e-30
        weight[8] *= 1e4
    screen = screen_for(model, copy, monkeypatch)
    if copy == "int8":
        quantized, scales, *_ = screen.int8_copy(weight.detach())
        weight_error = weight.detach().double() - scales.double()[:, None] * quantized.double()
    else:
        weight_error = weight.detach().double() - weight.detach().bfloat16().double()
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 512, generator=generator) * torch.tensor([[1.0], [1e-3], [50.0]])
    row_errors = weight_error.norm(dim=1)
    row_errors[[5, 8]] = 0
    worst = int(row_errors.argmax())
    along = (weight_error[worst] / weight_error[worst].norm()).float()
    hidden = torch.cat([hidden, 20 * along[None], 1e-3 * along[None]])
    exact = hidden.double() @ weight.detach().double().T
    for row in range(len(hidden)):
        approximate, c1, outliers = screen.approximate_logits(hidden[row : row + 1])
        assert set(outliers.tolist()) == ({5, 8} if copy == "int8" else {8})
        bounded = torch.ones(8192, dtype=torch.bool)
        bounded[outliers] = False
        error = (approximate[0].double() - exact[row]).abs()
        bound = c1 * float(hidden[row].norm()) + screen.c2 * approximate[0].double().abs()
        assert bool((error <= bound)[bounded].all()), row
        if row >= 3:
            assert float(error[worst]) >= float(bound[worst]) / (4 if copy == "int8" else 8), row
        best = exact[row, bounded].max()
        assert int((exact[row, bounded] >= best - 2 * bound[bounded].max()).sum()) <= 64

    # An outlier row that wins or loses by a hair, or is banned, for one row and for three at once: the screen still
    # returns float32's tokens.
    plain = dict(banned=[], min_new_tokens=0, eos=[2], forced_eos=None, max_new_tokens=50)
    bias = model.lm_head.bias
    for rows, outlier, margin, banned in itertools.product(
            (slice(0, 1), slice(1, 2), slice(2, 3), slice(0, 3)), outliers.tolist(), (1e-3, -1e-3), ([], [5, 8])):
        screen.decoder.hidden = hidden[rows]
        with torch.no_grad():
            bias.zero_()
            rivals = torch.nn.functional.linear(hidden[rows.start : rows.start + 1], weight)[0]
            own = float(rivals[outlier])
            rivals[outlier] = -math.inf
            bias[outlier] = float(rivals.max()) - own + margin * float(hidden[rows.start].norm())
            logits = torch.nn.functional.linear(hidden[rows], weight, bias)
        settings = dict(plain, banned=banned)
        expected = suppress_tokens(logits.clone(), 3, settings).argmax(dim=-1)
        assert (int(expected[0]) == outlier) == (margin > 0 and not banned)
        screen.largest_bias = float(bias.detach().abs().max())  # as a new search would find it
        assert torch.equal(screen(torch.zeros(len(expected), dtype=torch.long), 3, settings), expected), (rows, outlier)


@pytest.mark.parametrize("copy", SCREEN_COPIES)
def test_top_k_screen_keeps_exactly_the_float32_top_k(copy, monkeypatch):
    """Top-k sampling reads the screen's candidates (`GreedyScreen.top_k_logits`): after transformers' top-k warper,
    the tokens kept and their values are those of the full float32 logits, for every k from 1 to 64, although the
    copy's own top-k differs near the k-th value for many k (checked: the test is only meaningful if it does), for
    one row and for three, under the token suppressions, rarely falling back to the full product."""
    from transformers.generation.logits_process import TopKLogitsWarper

    model = screened_model()
    screen = screen_for(model, copy, monkeypatch)
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 512, generator=generator) * torch.tensor([[1.0], [4.0], [0.3]])
    plain = dict(banned=[], min_new_tokens=0, eos=[2], forced_eos=None, max_new_tokens=50)
    fallbacks = []
    monkeypatch.setattr(DecodeStepLinear, "__call__", lambda self, module, x, call=DecodeStepLinear.__call__:
                        fallbacks.append(module) or call(self, module, x))
    differs = 0
    for rows in (slice(0, 1), slice(1, 2), slice(0, 3)):
        screen.decoder.hidden = hidden[rows]
        with torch.no_grad():
            logits = torch.nn.functional.linear(hidden[rows], model.lm_head.weight, model.lm_head.bias)
            approximate = screen.approximate_logits(hidden[rows])[0] + model.lm_head.bias
        for settings in (plain, dict(plain, banned=[5, 7], min_new_tokens=9)):
            full, rough = suppress_tokens(logits.clone(), 3, settings), suppress_tokens(approximate, 3, settings)
            for k in range(1, 65):
                warper = TopKLogitsWarper(k)
                expected = warper(None, full.clone())
                kept = warper(None, screen.top_k_logits(torch.zeros(rows.stop - rows.start, dtype=torch.long), 3,
                                                        settings, k))
                assert torch.equal(kept == -math.inf, expected == -math.inf), (rows, k)
                torch.testing.assert_close(kept, expected, rtol=1e-5, atol=1e-5)  # float32 kernels round apart
                differs += not torch.equal(warper(None, rough.clone()) == -math.inf, expected == -math.inf)
    assert differs >= 20
    assert len(fallbacks) <= 384 // 10  # the full product, where more than `max_candidates` columns survive


@pytest.mark.parametrize("cpu", FEW_ROWS_SETTINGS)
@pytest.mark.parametrize("copy", SCREEN_COPIES)
def test_top_k_sampling_through_the_screen_draws_transformers_tokens(copy, cpu, monkeypatch):
    """On a model whose output projection the screen serves, top-k sampling runs through it and draws transformers'
    tokens from the same seed (either CPU's settings for few rows); without top-k (the full distribution) it does not
    use the screen."""
    use_few_rows_settings(monkeypatch, cpu)
    model = screened_model(1)
    skip_unless_screen_kernel(model, copy, monkeypatch)
    with torch.no_grad():
        model.lm_head.bias[2] = 3.0  # sentences end at different steps
    source, mask = padded_batch(seed=1, batch=3, vocab=8192)
    screened, call = [], GreedyScreen.top_k_logits
    monkeypatch.setattr(GreedyScreen, "top_k_logits", lambda self, *args: screened.append(args) or call(self, *args))
    for settings in (dict(top_k=5), dict(top_k=50, temperature=0.7, top_p=0.9), dict(top_k=0, top_p=0.8)):
        settings.update(do_sample=True, num_beams=1, max_new_tokens=10)
        steps = len(screened)
        torch.manual_seed(0)
        ours = model.generate(source, attention_mask=mask, **settings)
        torch.manual_seed(0)
        assert torch.equal(ours, GenerationMixin.generate(model, source, attention_mask=mask, **settings)), settings
        assert (len(screened) > steps) is bool(settings["top_k"]), settings


def test_greedy_screen_is_left_out_where_it_does_not_pay_off():
    source, mask = padded_batch(batch=2)
    with torch.no_grad():
        small = IncrementalDecoder(make_model(), source, mask, 1)  # a 64-token vocabulary: nothing to gain
        assert GreedyScreen.for_decoder(small) is None
        python = screened_model()
        python.decode_with_torchscript = False  # the screen needs the scripted step's hidden state
        assert GreedyScreen.for_decoder(IncrementalDecoder(python, source, mask, 1)) is None


def static_generate(model, source, mask, initial_capacity=64, return_decoder=False, **settings):
    """Greedy/beam search on `StaticIncrementalDecoder` without recording a graph (the GPU path's arithmetic)."""
    input_ids, attention_mask, search = model.fast_search_settings(source, None, dict(settings, attention_mask=mask))
    with torch.no_grad():
        decoder = StaticIncrementalDecoder(model, input_ids, attention_mask, search["num_beams"],
                                           search["max_new_tokens"], use_graph=False, initial_capacity=initial_capacity)
        ids = (greedy_search if search["num_beams"] == 1 else beam_search)(decoder, input_ids.shape[0], search)
    return (ids, decoder) if return_decoder else ids


@pytest.mark.parametrize("num_beams", [1, 4])
def test_static_decoder_cache_grows_as_sentences_get_longer(num_beams):
    """The fixed-size cache starts small and grows (16 -> 32 -> 48 positions for 40 tokens), keeping what it holds."""
    model = make_model(3)
    source, mask = padded_batch(seed=3, batch=3)
    settings = dict(num_beams=num_beams, min_new_tokens=40, max_new_tokens=40)
    ids, decoder = static_generate(model, source, mask, initial_capacity=16, return_decoder=True, **settings)
    assert decoder.capacity == 48 and decoder.self_keys_values[0][0].shape[2] == 48
    assert ids.shape[1] == 41
    assert torch.equal(ids, GenerationMixin.generate(model, source, attention_mask=mask, **settings))


def test_static_decoder_updates_what_its_recorded_step_reads_in_place(monkeypatch):
    """A recorded step reads the tensors it was recorded with. Between two recordings (the first step, and the first
    after each growth of the cache), every tensor the step reads must keep its memory: sentences that finish and
    beam reorders write into them. Checked on the CPU, where the step runs without a graph."""
    def read_by_step(decoder):
        tensors = [decoder.tokens, decoder.parents, decoder.position, decoder.key_positions, decoder.position_table]
        tensors += [t for pair in decoder.self_keys_values + decoder.cross_keys_values for t in pair]
        return [t.data_ptr() for t in tensors + ([decoder.cross_mask] if decoder.cross_mask is not None else [])]

    recorded, checked = {}, []
    step, grow = StaticIncrementalDecoder.static_step, StaticIncrementalDecoder.grow

    def checking_step(self):
        recorded.setdefault(id(self), read_by_step(self))
        assert read_by_step(self) == recorded[id(self)], "a tensor of the recorded step was replaced"
        checked.append(1)
        return step(self)

    def recording_again(self, capacity):
        grow(self, capacity)
        recorded.pop(id(self), None)

    monkeypatch.setattr(StaticIncrementalDecoder, "static_step", checking_step)
    monkeypatch.setattr(StaticIncrementalDecoder, "grow", recording_again)
    model = make_model(5, output_bias=True)
    with torch.no_grad():  # sentences end at different steps
        model.lm_head.bias[2] = 2.0
    source, mask = padded_batch(seed=5, batch=4)
    for settings in (dict(num_beams=1), dict(num_beams=4), dict(num_beams=3, num_return_sequences=2)):
        ids = static_generate(model, source, mask, initial_capacity=16, max_new_tokens=40, **settings)
        assert torch.equal(ids, GenerationMixin.generate(model, source, attention_mask=mask, max_new_tokens=40, **settings))
    assert len(checked) > 40


def test_only_a_plain_model_on_one_device_is_recorded_as_a_graph():
    """What a CUDA graph would get wrong runs step by step instead: hooks, autocast, dispatch modes, layers that are
    not plain `nn.Linear` (quantized, adapters). (`recordable` is device-independent, so it is checked here.)"""
    from torch.utils.flop_counter import FlopCounterMode

    from modeling_seq2seq.decoding_seq2seq import graph_safe, recordable

    model, cpu = make_model(), torch.device("cpu")
    assert recordable(model, cpu) and not graph_safe(model)  # the graph itself is a GPU thing
    handle = model.model.decoder.layers[1].final_layer_norm.register_forward_pre_hook(lambda *args: None)
    assert not recordable(model, cpu)
    handle.remove()
    model.model.decoder.layers[0]._hf_hook = object()  # accelerate's offloading and device maps
    assert not recordable(model, cpu)
    del model.model.decoder.layers[0]._hf_hook
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not recordable(model, cpu)
    with FlopCounterMode(display=False):
        assert not recordable(model, cpu)

    class Adapter(torch.nn.Linear):
        pass

    plain = model.model.decoder.layers[0].feed_forward.fc1
    adapter = Adapter(plain.in_features, plain.out_features)
    model.model.decoder.layers[0].feed_forward.fc1 = adapter
    assert not recordable(model, cpu)
    model.model.decoder.layers[0].feed_forward.fc1 = plain
    assert recordable(model, cpu)
    model.lm_head.to("meta")  # a layer elsewhere (offloaded, another device)
    assert not recordable(model, cpu)


def runs_scripted(model, source=None, mask=None, num_beams=1) -> bool:
    """Whether `generate`'s decode loop would run its step as TorchScript for this model, now."""
    if source is None:
        source, mask = padded_batch(batch=2)
    with torch.no_grad():
        return IncrementalDecoder(model, source, mask, num_beams).script is not None


@pytest.mark.parametrize("decoder", ["scripted", "python", "static"])
@pytest.mark.parametrize("seed", range(6))
def test_fast_generate_equals_transformers_generate(seed, decoder):
    """Our decode loops return exactly what transformers' own greedy/beam search returns: `IncrementalDecoder`
    (generate's path on a CPU) with its step as TorchScript and op by op in Python, and `StaticIncrementalDecoder`
    (fixed shapes: the path a GPU replays as a CUDA graph)."""
    model = make_model(seed, output_bias=True)
    model.decode_with_torchscript = decoder == "scripted"
    assert runs_scripted(model) == (decoder == "scripted")
    with torch.no_grad():  # make end-of-sentence likely, so sentences finish at different steps
        model.lm_head.bias[2] = 0.8 * (seed % 4)
    source, mask = padded_batch(seed=seed, batch=1 + seed % 4, length=5 + seed)
    cases = [
        dict(num_beams=1),
        dict(num_beams=4, length_penalty=0.6),
        dict(num_beams=3, length_penalty=1.0, num_return_sequences=2),
        dict(num_beams=4, min_new_tokens=3),
        dict(num_beams=2, bad_words_ids=[[5], [7]], forced_eos_token_id=2),
        dict(num_beams=1, min_new_tokens=2, forced_eos_token_id=2),
    ]
    for settings in cases:
        settings["max_new_tokens"] = 4 + 2 * seed
        assert model.fast_search_settings(source, None, dict(settings)) is not None
        if decoder == "static":
            ours = static_generate(model, source, mask, **settings)
        else:
            ours = model.generate(source, attention_mask=mask, **settings)
        reference = GenerationMixin.generate(model, source, attention_mask=mask, **settings)
        assert torch.equal(ours, reference), settings


def test_greedy_search_with_a_generous_length_limit_allocates_as_it_goes():
    """The fast greedy search allocated its output for `max_new_tokens` at once (8 TB for 10^12, where transformers'
    loop and Marian stop at the end of the sentence); it grows now, past its first sizes too, with transformers'
    tokens."""
    model = make_model(1, output_bias=True)
    source, mask = padded_batch(seed=3, batch=2)
    with torch.no_grad():
        model.lm_head.bias[2] = 6.0  # the end of the sentence comes first
    assert model.generate(source, attention_mask=mask, num_beams=1, max_new_tokens=10**12).shape == (2, 2)
    with torch.no_grad():
        model.lm_head.bias[2] = -30.0  # never: the limit ends the search, past two of the buffer's sizes
    for settings in (dict(max_new_tokens=150), dict(max_new_tokens=150, min_new_tokens=3)):
        expected = GenerationMixin.generate(model, source, attention_mask=mask, num_beams=1, **settings)
        assert torch.equal(model.generate(source, attention_mask=mask, num_beams=1, **settings), expected)


# --- Behaviour no other test pins down (a mutation review) ---------------------------------------------------------


def nn_transformer_with_our_weights(model):
    """torch.nn.Transformer (pre-norm, `norm_first=True`, with its final encoder and decoder norms) holding `model`'s
    weights, in float64: an independent reference for `layer_norm_position="pre"`, which MarianMTModel cannot give."""
    config = model.config
    reference = torch.nn.Transformer(
        config.d_model, config.encoder_attention_heads, config.encoder_layers, config.decoder_layers,
        config.encoder_ffn_dim, dropout=0.0, layer_norm_eps=config.layer_norm_eps, batch_first=True, norm_first=True,
    ).double().eval()

    def copy_linear(weight_and_bias, *sources):
        weight, bias = weight_and_bias
        weight.copy_(torch.cat([s.weight for s in sources]))
        bias.copy_(torch.cat([s.bias for s in sources]))

    with torch.no_grad():
        for ours, theirs in zip(model.model.encoder.layers, reference.encoder.layers):
            copy_linear((theirs.self_attn.in_proj_weight, theirs.self_attn.in_proj_bias), ours.self_attn.qkv_proj)
            copy_linear((theirs.self_attn.out_proj.weight, theirs.self_attn.out_proj.bias), ours.self_attn.out_proj)
            copy_linear((theirs.linear1.weight, theirs.linear1.bias), ours.feed_forward.fc1)
            copy_linear((theirs.linear2.weight, theirs.linear2.bias), ours.feed_forward.fc2)
            copy_linear((theirs.norm1.weight, theirs.norm1.bias), ours.self_attn_layer_norm)
            copy_linear((theirs.norm2.weight, theirs.norm2.bias), ours.final_layer_norm)
        for ours, theirs in zip(model.model.decoder.layers, reference.decoder.layers):
            copy_linear((theirs.self_attn.in_proj_weight, theirs.self_attn.in_proj_bias), ours.self_attn.qkv_proj)
            copy_linear((theirs.self_attn.out_proj.weight, theirs.self_attn.out_proj.bias), ours.self_attn.out_proj)
            copy_linear((theirs.multihead_attn.in_proj_weight, theirs.multihead_attn.in_proj_bias),
                        ours.cross_attn.q_proj, ours.cross_attn.kv_proj)
            copy_linear((theirs.multihead_attn.out_proj.weight, theirs.multihead_attn.out_proj.bias), ours.cross_attn.out_proj)
            copy_linear((theirs.linear1.weight, theirs.linear1.bias), ours.feed_forward.fc1)
            copy_linear((theirs.linear2.weight, theirs.linear2.bias), ours.feed_forward.fc2)
            copy_linear((theirs.norm1.weight, theirs.norm1.bias), ours.self_attn_layer_norm)
            copy_linear((theirs.norm2.weight, theirs.norm2.bias), ours.cross_attn_layer_norm)
            copy_linear((theirs.norm3.weight, theirs.norm3.bias), ours.final_layer_norm)
        copy_linear((reference.encoder.norm.weight, reference.encoder.norm.bias), model.model.encoder.layer_norm)
        copy_linear((reference.decoder.norm.weight, reference.decoder.norm.bias), model.model.decoder.layer_norm)
    return reference


def test_pre_norm_logits_equal_torch_nn_transformer_with_the_same_weights():
    """Pre-norm (x + Sublayer(LayerNorm(x)), then a final LayerNorm on each stack) against torch's own pre-norm
    Transformer in float64; the embeddings (scaled by sqrt(d_model)) and Section 3.5's sinusoids computed here."""
    model = make_model(layer_norm_position="pre", output_bias=True)
    reference = nn_transformer_with_our_weights(model)
    source, mask = padded_batch()
    target = torch.randint(4, VOCAB, (4, 7))
    d_model, weight = model.config.d_model, model.lm_head.weight.detach().double()

    def embed(ids):  # split layout: all sines, then all cosines
        angles = torch.arange(ids.shape[1], dtype=torch.float64)[:, None] / 10000 ** (
            torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
        return weight[ids] * math.sqrt(d_model) + torch.cat([angles.sin(), angles.cos()], -1)

    with torch.no_grad():
        ours = model(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits.double()
        hidden = reference(embed(source), embed(target), src_key_padding_mask=mask == 0, memory_key_padding_mask=mask == 0,
                           tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64))
        expected = hidden @ weight.T + model.lm_head.bias.double()
    assert (ours - expected).abs().max() < 1e-4


def test_training_draws_dropout_where_the_paper_and_the_config_say():
    """Section 5.4: dropout on each sub-layer's output and on the embedding sums of both stacks; `attention_dropout`
    on the attention weights and `activation_dropout` after the feed-forward activation. Counted by the masks drawn
    (eager attention draws its weights' mask here; SDPA gets the probability), none in evaluation."""
    drawn, sdpa_p = [], []
    draw = modeling_seq2seq.dropout_mask
    sdpa = F.scaled_dot_product_attention

    def spy_draw(shape, p, dtype):
        drawn.append((tuple(shape), p))
        return draw(shape, p, dtype)

    def spy_sdpa(*args, dropout_p=0.0, **kwargs):
        sdpa_p.append(dropout_p)
        return sdpa(*args, dropout_p=dropout_p, **kwargs)

    source, mask = padded_batch()
    labels = torch.randint(4, VOCAB, (4, 6))
    (batch, source_length), target_length, d_model, heads, ffn = source.shape, 6, 32, 4, 64
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling_seq2seq, "dropout_mask", spy_draw)
        patch.setattr(F, "scaled_dot_product_attention", spy_sdpa)
        for implementation in ("eager", "sdpa"):
            model = make_model(dropout=0.1, attention_dropout=0.2, activation_dropout=0.3).train()
            model.config._attn_implementation = implementation
            drawn.clear(), sdpa_p.clear()
            model(input_ids=source, attention_mask=mask, labels=labels).loss.backward()
            expected = {
                ((batch, source_length, d_model), 0.1): 1 + 2 * 2,  # embeddings, 2 sub-layers x 2 encoder layers
                ((batch, target_length, d_model), 0.1): 1 + 3 * 2,  # embeddings, 3 sub-layers x 2 decoder layers
                ((batch, source_length, ffn), 0.3): 2,
                ((batch, target_length, ffn), 0.3): 2,
            }
            if implementation == "eager":
                expected.update({((batch, heads, source_length, source_length), 0.2): 2,
                                 ((batch, heads, target_length, target_length), 0.2): 2,
                                 ((batch, heads, target_length, source_length), 0.2): 2})
            else:
                assert sdpa_p == [0.2] * 6
            assert collections.Counter(drawn) == expected, implementation
            drawn.clear(), sdpa_p.clear()
            with torch.no_grad():
                model.eval()(input_ids=source, attention_mask=mask, labels=labels)
            assert drawn == [] and set(sdpa_p) <= {0.0}


def test_sampling_with_one_beam_draws_transformers_tokens_from_the_same_seed():
    """`do_sample=True` with one beam runs on the decode loop (`MultinomialDraw`) and draws what transformers'
    sampling draws from the same seed, with each warper it supports, several sequences per source, the length and
    token rules, and sentences that end at different steps (transformers keeps drawing for finished ones), and it
    leaves the random generator where transformers' loop leaves it. Beam sampling and other warpers go to
    transformers' loop."""
    model = make_model(output_bias=True)
    with torch.no_grad():
        model.lm_head.bias[2] = 0.8  # some sentences end early, others run to the limit
    source, mask = padded_batch()
    ended_early = False
    for settings in (dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8, temperature=1.3), dict(top_k=0),
                     dict(num_return_sequences=3, top_k=20),
                     dict(min_new_tokens=3, bad_words_ids=[[7]], forced_eos_token_id=2)):
        settings.update(do_sample=True, num_beams=1, max_new_tokens=10)
        assert model.fast_search_settings(source, None, dict(settings, attention_mask=mask)) is not None, settings
        torch.manual_seed(0)
        ours, ours_next = model.generate(source, attention_mask=mask, **settings), torch.rand(4)
        torch.manual_seed(0)
        theirs, theirs_next = GenerationMixin.generate(model, source, attention_mask=mask, **settings), torch.rand(4)
        assert torch.equal(ours, theirs) and torch.equal(ours_next, theirs_next), settings
        searched = model.generate(source, attention_mask=mask, **{**settings, "do_sample": False, "top_k": None,
                                                                    "num_return_sequences": 1})
        assert ours.shape != searched.shape or not torch.equal(ours, searched), settings
        finished = (ours[:, 1:] == 2).any(dim=1)
        ended_early |= bool(finished.any()) and not bool(finished.all())
    assert ended_early
    for settings in (dict(num_beams=3), dict(num_beams=1, min_p=0.1), dict(num_beams=1, typical_p=0.9)):
        settings.update(do_sample=True, max_new_tokens=8)
        assert model.fast_search_settings(source, None, dict(settings, attention_mask=mask)) is None, settings
        torch.manual_seed(0)
        ours = model.generate(source, attention_mask=mask, **settings)
        torch.manual_seed(0)
        assert torch.equal(ours, GenerationMixin.generate(model, source, attention_mask=mask, **settings)), settings


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_gradients_where_the_matmul_primitive_may_not_be_used(bias, onednn_products, monkeypatch):
    """On CPUs with AMX (the GPU machine's Xeon) or torch < 2.9 `onednn_matmul_keeps_float32` is False and d/dx takes
    oneDNN's inner product with the transposed weight: that branch, against a float64 recomputation, whatever this
    machine is. A square weight too, where a transposition error keeps the shapes."""
    monkeypatch.setattr(modeling_seq2seq, "onednn_matmul_probe", {"keeps_float32": False})
    torch.manual_seed(0)
    for out_features in (1536, 1024):
        module = torch.nn.Linear(1024, out_features, bias=bias)
        x = torch.randn(4, 40, 1024, requires_grad=True)
        output = linear(module, x)
        assert ran_on_onednn(output)
        upstream = torch.randn(output.shape)
        output.backward(upstream)
        reference_module = copy.deepcopy(module).double()
        reference_x = x.detach().double().requires_grad_()
        reference_module(reference_x).backward(upstream.double())
        assert torch.allclose(x.grad.double(), reference_x.grad, atol=1e-4)
        assert torch.allclose(module.weight.grad.double(), reference_module.weight.grad, atol=1e-3)


def test_beam_search_stops_at_the_step_transformers_stops():
    """The fast beam search ends a sentence when transformers' `early_stopping=False` heuristic does (the best running
    score over length^penalty cannot beat the worst finished hypothesis): it runs as many decode steps as
    transformers' loop runs forwards. Tokens alone rarely show a late stop (the extra steps seldom find better)."""
    mismatches = []
    for seed in range(6):
        model = make_model(seed, output_bias=True)
        with torch.no_grad():
            model.lm_head.bias[2] = 1.0 + 0.5 * (seed % 3)  # sentences end well before the length limit
        for case in range(3):
            source, mask = padded_batch(seed=3 * seed + case, batch=1, length=7)
            for penalty in (0.6, 1.0, 2.0, -0.5):
                settings = dict(num_beams=3, length_penalty=penalty, max_new_tokens=12)
                steps, forwards = [], []
                step = decoding_seq2seq.IncrementalDecoder.step
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(decoding_seq2seq.IncrementalDecoder, "step",
                                  lambda self, *args, **kwargs: steps.append(1) or step(self, *args, **kwargs))
                    ours = model.generate(source, attention_mask=mask, **settings)
                handle = model.register_forward_hook(lambda *args: forwards.append(1))
                try:
                    theirs = GenerationMixin.generate(model, source, attention_mask=mask, **settings)
                finally:
                    handle.remove()
                if len(steps) != len(forwards) or not torch.equal(ours, theirs):
                    mismatches.append((seed, case, penalty, len(steps), len(forwards)))
    assert not mismatches


@pytest.mark.parametrize("cpu", FEW_ROWS_SETTINGS)
def test_the_scripted_step_leaves_few_rows_to_f_linear_as_decode_step_linear_does(cpu, monkeypatch):
    """`scripted_linear` (the TorchScript step's products) picks the kernel `DecodeStepLinear` picks: up to
    `FEW_ROWS_ON_MKL` rows by F.linear, bit for bit (on Intel CPUs, where MKL is the faster), more by oneDNN."""
    mkl_rows, _ = use_few_rows_settings(monkeypatch, cpu)
    model = wide_model()
    linear = DecodeStepLinear(model, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    for module in (model.lm_head, model.model.decoder.layers[0].feed_forward.fc1):
        packed, bias = linear.weights(module)
        scripted = (module.weight, module.bias, packed, linear.padding(module.in_features), linear.mkl_rows)
        for rows in (1, 2, 3, 6, 32):
            x = torch.randn(rows, module.in_features) * 10
            output = decoding_seq2seq.scripted_linear(x, scripted)
            assert torch.equal(output, linear(module, x)), (rows, cpu)
            if rows <= mkl_rows:
                assert torch.equal(output, F.linear(x, module.weight, module.bias)), (rows, cpu)


def test_a_decoder_mask_of_the_new_tokens_only_attends_to_the_cached_ones():
    """With a cache, a `decoder_attention_mask` covering only the new tokens (as some callers pass it) leaves every
    cached token attended: the same logits as the full forward, and as MarianMTModel given the full mask."""
    model = make_model()
    marian = to_marian(model).eval()
    source, mask = padded_batch()
    target = torch.randint(4, VOCAB, (4, 8))
    with torch.no_grad():
        full = model(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
        assert torch.allclose(full, marian(input_ids=source, attention_mask=mask, decoder_input_ids=target,
                                           decoder_attention_mask=torch.ones_like(target)).logits, atol=1e-5)
        encoder_outputs = model.get_encoder()(input_ids=source, attention_mask=mask)
        prefix = model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=target[:, :5], use_cache=True)
        new = target[:, 5:]
        out = model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=new,
                    cache=getattr(prefix, CACHE_FIELD), decoder_attention_mask=torch.ones_like(new), use_cache=True)
    assert (out.logits - full[:, 5:]).abs().max().item() < 1e-5


def test_attention_masks_are_built_in_the_autocast_dtype():
    """Under autocast the attention scores are in the autocast dtype (bf16 on a GPU in training), and so must the
    additive masks be, or every score is promoted to float32 (and SDPA's fused kernels get a float32 mask); float64
    stays float64, as autocast leaves it alone."""
    x = torch.zeros(1, 3, 8)
    assert attention_dtype(x) == torch.float32
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            assert attention_dtype(x) == dtype and attention_dtype(x.double()) == torch.float64
            assert padding_mask(torch.tensor([[1, 1, 0]]), attention_dtype(x)).dtype == dtype


# --- transformers plumbing, against MarianMTModel and transformers' own conventions ------------------------------


def test_config_attribute_map_reads_as_marians_with_asymmetric_stacks():
    """`num_hidden_layers` / `num_attention_heads` / `hidden_size` mean what MarianConfig's do (the encoder's), and
    transformers' per-stack view (`get_text_config`) gives each stack its own; the common tests use equal stacks, so
    only different sizes tell the two apart."""
    from transformers import MarianConfig

    sizes = dict(d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=2)
    ours, marian = tiny_config(**sizes), MarianConfig(**sizes)
    for name in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        assert getattr(ours, name) == getattr(marian, name), name
    for decoder in (True, False):
        ours_text = ours.get_text_config(decoder=decoder, encoder=not decoder)
        marian_text = marian.get_text_config(decoder=decoder, encoder=not decoder)
        for name in ("num_hidden_layers", "num_attention_heads"):
            assert getattr(ours_text, name) == getattr(marian_text, name), (decoder, name)
    ours.num_hidden_layers = 5  # the map also writes
    assert ours.encoder_layers == 5 and ours.decoder_layers == 2


def test_embeddings_are_initialised_with_init_std():
    """`init_std` sets the embedding's standard deviation (default d_model^-0.5); the statistic of 64 x 512 draws is
    within a few percent of it."""
    for init_std, expected in ((None, 512**-0.5), (0.02, 0.02)):
        model = make_model(d_model=512, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=1, decoder_layers=1,
                           init_std=init_std)
        std = model.get_input_embeddings().weight.detach().double().std().item()
        assert abs(std / expected - 1) < 0.05, (init_std, std)


def eager_pair_with_unequal_stacks():
    """Ours and its Marian twin with eager attention (which returns the maps), 3 encoder and 2 decoder layers, and a
    batch whose source and target lengths differ: (model, marian, source, mask, target)."""
    model = make_model(dropout=0.0, encoder_layers=3, decoder_layers=2)
    model.config._attn_implementation = "eager"
    marian = to_marian(model).eval()
    marian.config._attn_implementation = "eager"
    source, mask = padded_batch()
    return model, marian, source, mask, torch.randint(4, VOCAB, (4, 6))


@pytest.mark.parametrize("return_dict", [True, False])
def test_hidden_states_and_attentions_equal_marians_one_by_one(return_dict):
    """Every returned hidden state and attention map, in transformers' order (embeddings first; self- vs
    cross-attention kept apart), equals MarianMTModel's with the same weights; and `return_dict=False` gives Marian's
    tuple, element by element. Encoder and decoder lengths differ, so swapped maps would not even match in shape."""
    model, marian, source, mask, target = eager_pair_with_unequal_stacks()
    kwargs = dict(input_ids=source, attention_mask=mask, decoder_input_ids=target, output_hidden_states=True,
                  output_attentions=True, use_cache=False, return_dict=return_dict)
    with torch.no_grad():
        ours, theirs = model(**kwargs), marian(**kwargs)
    if return_dict:
        fields = ("logits", "decoder_hidden_states", "decoder_attentions", "cross_attentions",
                  "encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions")
        ours, theirs = [getattr(ours, f) for f in fields], [getattr(theirs, f) for f in fields]
    assert len(ours) == len(theirs)
    for index, (a, b) in enumerate(zip(ours, theirs)):
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        assert len(a) == len(b), index
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m: f"output {index}: {m}")


def test_the_last_hidden_state_returned_is_the_normalised_one_with_pre_norm():
    """transformers' convention (BART/mBART with a final LayerNorm): `hidden_states[-1]` is the stack's output, after
    its final LayerNorm, i.e. `last_hidden_state`; and `hidden_states[0]` is the embeddings plus positions."""
    model = make_model(layer_norm_position="pre", dropout=0.0)
    source, mask = padded_batch()
    target = torch.randint(4, VOCAB, (4, 6))
    with torch.no_grad():
        out = model.model(input_ids=source, attention_mask=mask, decoder_input_ids=target, output_hidden_states=True)
    assert torch.equal(out.encoder_hidden_states[-1], out.encoder_last_hidden_state)
    assert torch.equal(out.decoder_hidden_states[-1], out.last_hidden_state)
    positions = SinusoidalPositionalEncoding(32, 64, "split")
    torch.testing.assert_close(out.encoder_hidden_states[0], model.get_input_embeddings()(source) + positions(11, 0, source.device))
    torch.testing.assert_close(out.decoder_hidden_states[0], model.get_input_embeddings()(target) + positions(6, 0, source.device))


def count_sdpa_calls(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    return calls


def test_the_attention_implementation_chosen_is_the_one_that_runs(tmp_path, monkeypatch):
    """`attn_implementation` decides the kernel, as in transformers' models: "sdpa" runs every attention through
    `F.scaled_dot_product_attention` (3 per decoder layer pair, encoder self, decoder self and cross), "eager" never
    does, and `output_attentions=True` falls back to eager (SDPA returns no weights)."""
    make_model().save_pretrained(tmp_path)
    source, mask = padded_batch()
    target = torch.randint(4, VOCAB, (4, 6))
    calls = count_sdpa_calls(monkeypatch)
    for implementation, expected in (("sdpa", 2 + 2 * 2), ("eager", 0)):
        model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        for switched in (False, True):
            if switched:  # transformers' generic switch, after loading
                model.set_attn_implementation("eager" if implementation == "sdpa" else "sdpa")
                expected = 6 - expected
            calls.clear()
            with torch.no_grad():
                model(input_ids=source, attention_mask=mask, decoder_input_ids=target)
            assert len(calls) == expected, (implementation, switched)
            calls.clear()
            with torch.no_grad():
                out = model(input_ids=source, attention_mask=mask, decoder_input_ids=target, output_attentions=True)
            assert not calls and len(out.cross_attentions) == 2


def test_use_cache_false_returns_no_cache_and_true_returns_marians():
    """As MarianMTModel: `use_cache=False` returns no cache; `use_cache=True` returns one whose self-attention part
    holds the decoder's keys and values for each layer, and whose cross-attention part the encoder's."""
    model = make_model(dropout=0.0)
    marian = to_marian(model).eval()
    source, mask = padded_batch()
    target = torch.randint(4, VOCAB, (4, 6))
    with torch.no_grad():
        for use_cache in (False, True):
            ours = model(input_ids=source, attention_mask=mask, decoder_input_ids=target, use_cache=use_cache)
            theirs = marian(input_ids=source, attention_mask=mask, decoder_input_ids=target, use_cache=use_cache)
            if not use_cache:
                assert getattr(ours, CACHE_FIELD) is None and getattr(theirs, CACHE_FIELD) is None
                continue
            cache, marians = getattr(ours, CACHE_FIELD), getattr(theirs, CACHE_FIELD)
            assert isinstance(cache, EncoderDecoderCache) and cache.get_seq_length() == 6
            for layer in range(2):
                assert cache.self_attention_cache.layers[layer].keys.shape == (4, 4, 6, 8)
                assert cache.cross_attention_cache.layers[layer].keys.shape == (4, 4, 11, 8)
                for part in ("self_attention_cache", "cross_attention_cache"):
                    ours_layer, marians_layer = (getattr(c, part).layers[layer] for c in (cache, marians))
                    assert torch.allclose(ours_layer.keys, marians_layer.keys, atol=1e-5), (part, layer)
                    assert torch.allclose(ours_layer.values, marians_layer.values, atol=1e-5), (part, layer)


def test_gradient_checkpointing_recomputes_every_layer_in_training_only(monkeypatch):
    """transformers' convention (`GradientCheckpointingLayer`): with checkpointing on, every encoder and decoder layer
    runs its forward again in the backward (its sub-modules are called twice); in evaluation (no backward to replay, even with gradients enabled) each
    runs once and the cache is kept, as MarianMTModel keeps it."""
    model = make_model(dropout=0.0)
    marian = to_marian(model)
    calls = collections.Counter()
    layers = [*model.model.encoder.layers, *model.model.decoder.layers]
    for index, layer in enumerate(layers):
        # On a sub-module: transformers checkpoints the layer's `forward`, so the layer's own hooks run once.
        layer.feed_forward.register_forward_pre_hook(lambda module, args, index=index: calls.update([index]))
    source, mask = padded_batch()
    target = torch.randint(4, VOCAB, (4, 6))
    for m in (model, marian):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model(input_ids=source, attention_mask=mask, labels=target).loss.backward()
    assert all(calls[i] == 2 for i in range(len(layers))), calls
    # Training with checkpointing keeps no cache, even when asked for one: Marian returns none either.
    marian.train()
    out = model(input_ids=source, attention_mask=mask, decoder_input_ids=target, use_cache=True)
    reference = marian(input_ids=source, attention_mask=mask, decoder_input_ids=target, use_cache=True)
    assert getattr(out, CACHE_FIELD) is None and getattr(reference, CACHE_FIELD) is None
    calls.clear()
    model.eval()
    marian.eval()
    out = model(input_ids=source, attention_mask=mask, decoder_input_ids=target, use_cache=True)
    assert all(calls[i] == 1 for i in range(len(layers))), calls
    reference = marian(input_ids=source, attention_mask=mask, decoder_input_ids=target, use_cache=True)
    assert getattr(out, CACHE_FIELD) is not None and getattr(reference, CACHE_FIELD) is not None


@pytest.mark.parametrize("level", ["model", "lm"])
def test_set_input_embeddings_reaches_both_stacks_as_in_marian(level):
    """`set_input_embeddings(new)` on either class makes `new` the embedding of the source and of the target, as on
    MarianMTModel (shared embeddings); the forward then reads it, on both sides."""
    model = make_model()
    marian = to_marian(model)
    target_model = model if level == "lm" else model.model
    new = modeling_seq2seq.ScaledWordEmbedding(VOCAB, 32, math.sqrt(32), 0)
    torch.nn.init.normal_(new.weight)
    target_model.set_input_embeddings(new)
    (marian if level == "lm" else marian.model).set_input_embeddings(torch.nn.Embedding(VOCAB, 32, 0))
    assert model.get_input_embeddings() is new
    assert model.get_encoder().embed_tokens is new and model.get_decoder().embed_tokens is new
    assert marian.get_encoder().embed_tokens is marian.get_decoder().embed_tokens  # the reference's convention
    source, mask = padded_batch()
    target = torch.randint(4, VOCAB, (4, 6))
    with torch.no_grad():
        out = model.model(input_ids=source, attention_mask=mask, decoder_input_ids=target, output_hidden_states=True)
    positions = SinusoidalPositionalEncoding(32, 64, "split")
    torch.testing.assert_close(out.encoder_hidden_states[0], new(source) + positions(11, 0, source.device))
    torch.testing.assert_close(out.decoder_hidden_states[0], new(target) + positions(6, 0, source.device))


def test_the_stacks_tuples_and_tuple_encoder_outputs_are_marians():
    """`return_dict=False` on the encoder and decoder alone gives Marian's tuples in Marian's order, and encoder
    outputs passed back as a tuple (`encoder_outputs=encoder(..., return_dict=False)`) come back in the model's output
    as Marian returns them."""
    model, marian, source, mask, target = eager_pair_with_unequal_stacks()
    flags = dict(output_hidden_states=True, output_attentions=True, return_dict=False)

    def assert_same(a, b, what):
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        assert len(a) == len(b), what
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")

    with torch.no_grad():
        ours = model.get_encoder()(input_ids=source, attention_mask=mask, **flags)
        theirs = marian.get_encoder()(input_ids=source, attention_mask=mask, **flags)
        assert len(ours) == len(theirs) == 3
        for index, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"encoder output {index}")
        decoder_kwargs = dict(input_ids=target, encoder_hidden_states=ours[0], encoder_attention_mask=mask,
                              use_cache=False, **flags)
        ours_decoder, theirs_decoder = model.get_decoder()(**decoder_kwargs), marian.get_decoder()(**decoder_kwargs)
        assert len(ours_decoder) == len(theirs_decoder)
        for index, (a, b) in enumerate(zip(ours_decoder, theirs_decoder)):
            assert_same(a, b, f"decoder output {index}")
        kwargs = dict(attention_mask=mask, decoder_input_ids=target, use_cache=False)
        ours_full = model(encoder_outputs=ours, **kwargs)
        theirs_full = marian(encoder_outputs=theirs, **kwargs)
        for field in ("encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions"):
            assert_same(getattr(ours_full, field), getattr(theirs_full, field), field)


def test_a_cache_passed_with_use_cache_false_is_still_read_as_marian_reads_it():
    """A step on a given cache with `use_cache=False` attends to the cached tokens (the full forward's logits at
    those positions), and extends the cache, as MarianMTModel does."""
    model = make_model(dropout=0.0)
    marian = to_marian(model).eval()
    source, mask = padded_batch()
    target = torch.randint(4, VOCAB, (4, 8))
    with torch.no_grad():
        full = model(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
        for implementation in (model, marian):
            prefix = implementation(input_ids=source, attention_mask=mask, decoder_input_ids=target[:, :5], use_cache=True)
            cache = getattr(prefix, CACHE_FIELD)
            step = implementation(input_ids=source, attention_mask=mask, decoder_input_ids=target[:, 5:],
                                  use_cache=False, **{CACHE_FIELD: cache})
            assert (step.logits - full[:, 5:]).abs().max() < 1e-5, type(implementation).__name__
            assert cache.get_seq_length() == 8
