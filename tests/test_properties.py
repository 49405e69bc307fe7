"""Property-based tests (hypothesis) over random small configurations and inputs (issue 7).

Each example draws a model (width, heads, layers, feed-forward width, vocabulary, pre/post LayerNorm, sinusoid
layout, tied or untied output projection, output bias, embedding scaling, activation, eager/SDPA attention, and a
`max_position_embeddings` small enough that inputs often run past it) and a padded batch, then checks:

- forward, loss, backward and generate never crash and never produce NaN/inf;
- padding invariance: a sequence alone and the same sequence padded inside a batch get the same logits;
- cache invariance: incremental decoding with the cache equals the full forward, and generate with and without
  the cache gives the same ids;
- our fast `generate` (greedy and beam search) returns exactly what transformers' stock
  `GenerationMixin.generate(model, ...)` returns (or, where float32 cannot break a tie, a sequence as long and as
  likely in float64), and the fast path is really taken.

The examples are derandomized (the same on every run and in CI) and sized so the file runs in about a minute.
"""

import copy
import warnings

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from modeling_seq2seq import Seq2SeqTransformerConfig, Seq2SeqTransformerForConditionalGeneration

PAD, BOS, EOS = 0, 1, 2
FIRST_WORD = 3  # ids drawn for words: never a special token

COMMON = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw, dropout=0.0):
    heads = draw(st.sampled_from([1, 2, 4]))
    d_model = heads * draw(st.sampled_from([2, 4, 8]))
    return Seq2SeqTransformerConfig(
        vocab_size=draw(st.integers(5, 40)),
        d_model=d_model,
        encoder_layers=draw(st.integers(1, 2)),
        decoder_layers=draw(st.integers(1, 2)),
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=draw(st.sampled_from([4, 8, 32])),
        decoder_ffn_dim=draw(st.sampled_from([4, 8, 32])),
        max_position_embeddings=draw(st.integers(1, 8)),  # often shorter than the inputs: the table must grow
        layer_norm_position=draw(st.sampled_from(["post", "pre"])),
        positional_encoding_layout=draw(st.sampled_from(["split", "interleaved"])),
        tie_word_embeddings=draw(st.booleans()),
        output_bias=draw(st.booleans()),
        scale_embedding=draw(st.booleans()),
        activation_function=draw(st.sampled_from(["relu", "gelu"])),
        dropout=dropout,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
    )


@st.composite
def models(draw, dropout=0.0):
    config = draw(configs(dropout=dropout))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = Seq2SeqTransformerForConditionalGeneration(config).eval()
    model.config._attn_implementation = draw(st.sampled_from(["eager", "sdpa"]))
    return model


@st.composite
def padded_batches(draw, vocab_size, max_batch=3, max_length=9):
    """Right-padded source ids (pad id under the padding), their 1/0 mask and the true lengths."""
    lengths = draw(st.lists(st.integers(1, max_length), min_size=1, max_size=max_batch))
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        words = draw(st.lists(st.integers(FIRST_WORD, vocab_size - 1), min_size=length, max_size=length))
        ids[row, :length] = torch.tensor(words)
        mask[row, :length] = 1
    return ids, mask, lengths


def targets(draw, vocab_size, batch, max_length=6):
    length = draw(st.integers(1, max_length))
    words = draw(st.lists(st.integers(FIRST_WORD, vocab_size - 1), min_size=batch * length, max_size=batch * length))
    return torch.tensor(words).view(batch, length)


def quiet_generate(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


@pytest.fixture(autouse=True, scope="module")
def quiet_single_thread():
    """One intra-op thread: these models are tiny, and on a shared CPU thread hand-offs cost 50x the maths."""
    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()  # "Both max_new_tokens and max_length are set" on every call
    torch.set_num_threads(1)
    yield
    transformers.logging.set_verbosity(verbosity)
    torch.set_num_threads(threads)


@settings(max_examples=60, **COMMON)
@given(data=st.data())
def test_forward_backward_and_generate_are_finite(data):
    model = data.draw(models(dropout=data.draw(st.sampled_from([0.0, 0.1]))))
    vocab = model.config.vocab_size
    source, mask, _ = data.draw(padded_batches(vocab))
    labels = targets(data.draw, vocab, source.shape[0])
    if labels.shape[1] > 1:
        labels[0, -1] = -100  # an ignored position (not all of them: a mean over no tokens is NaN, as in torch)

    model.train()
    out = model(input_ids=source, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)

    model.eval()
    num_beams = data.draw(st.integers(1, 3))
    max_new = data.draw(st.integers(1, 10))
    generated = quiet_generate(model.generate, source, attention_mask=mask, num_beams=num_beams, max_new_tokens=max_new)
    assert generated.shape[0] == source.shape[0] and 2 <= generated.shape[1] <= max_new + 1
    assert (generated[:, 0] == BOS).all() and generated.min() >= 0 and generated.max() < vocab


@settings(max_examples=60, **COMMON)
@given(data=st.data())
def test_padding_does_not_change_a_sequence(data):
    """Encoder padding (with `attention_mask`) and decoder padding (with `decoder_attention_mask`) are invisible."""
    model = data.draw(models())
    vocab = model.config.vocab_size
    source, mask, lengths = data.draw(padded_batches(vocab))
    target = targets(data.draw, vocab, source.shape[0])
    target_lengths = [data.draw(st.integers(1, target.shape[1])) for _ in lengths]
    target_mask = torch.zeros_like(target)
    for row, n in enumerate(target_lengths):
        target_mask[row, :n] = 1
    padded_target = target.masked_fill(target_mask == 0, PAD)
    with torch.no_grad():
        batch = model(
            input_ids=source, attention_mask=mask, decoder_input_ids=padded_target, decoder_attention_mask=target_mask
        ).logits
        assert torch.isfinite(batch).all()
        for row, (n, m) in enumerate(zip(lengths, target_lengths)):
            alone = model(input_ids=source[row : row + 1, :n], decoder_input_ids=target[row : row + 1, :m]).logits
            torch.testing.assert_close(batch[row, :m], alone[0], atol=1e-5, rtol=1e-5)


@settings(max_examples=50, **COMMON)
@given(data=st.data())
def test_cache_gives_the_same_logits_and_ids(data):
    """Token-by-token decoding through the cache equals the full forward, also past `max_position_embeddings`;
    and generate returns the same ids with and without the cache."""
    model = data.draw(models())
    vocab = model.config.vocab_size
    source, mask, _ = data.draw(padded_batches(vocab))
    target = targets(data.draw, vocab, source.shape[0], max_length=9)
    with torch.no_grad():
        full = model(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
        encoder_outputs = model.get_encoder()(input_ids=source, attention_mask=mask)
        cache, steps = None, []
        for t in range(target.shape[1]):
            out = model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=target[:, t : t + 1],
                        cache=cache, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)

    search = dict(num_beams=data.draw(st.integers(1, 3)), max_new_tokens=data.draw(st.integers(1, 6)))
    with_cache = quiet_generate(model.generate, source, attention_mask=mask, use_cache=True, **search)
    without = quiet_generate(model.generate, source, attention_mask=mask, use_cache=False, **search)
    assert torch.equal(with_cache, without), search


def check_fast_generate_equals_transformers_generate(data):
    model = data.draw(models())
    source, mask, _ = data.draw(padded_batches(model.config.vocab_size))
    num_beams = data.draw(st.integers(1, 4))
    max_new = data.draw(st.integers(1, 10))
    search = dict(num_beams=num_beams, max_new_tokens=max_new, min_new_tokens=data.draw(st.integers(0, max_new)))
    if num_beams > 1:
        search["num_return_sequences"] = data.draw(st.integers(1, num_beams))
        search["length_penalty"] = data.draw(st.sampled_from([0.6, 1.0, 2.0, -0.5]))
    if data.draw(st.booleans()):
        search["bad_words_ids"] = [[data.draw(st.integers(FIRST_WORD, model.config.vocab_size - 1))]]
    if data.draw(st.booleans()):
        search["forced_eos_token_id"] = EOS
    # The fast path must really run: otherwise this test would compare transformers with itself.
    assert model.fast_search_settings(source, None, dict(search, attention_mask=mask)) is not None, search
    ours = quiet_generate(model.generate, source, attention_mask=mask, **search)
    stock = quiet_generate(transformers.GenerationMixin.generate, model, source, attention_mask=mask, **search)
    assert ours.shape == stock.shape, (search, ours.tolist(), stock.tolist())
    if not torch.equal(ours, stock):
        assert_float32_ties(model, source, mask, ours, stock, search)


def assert_float32_ties(model, source, mask, ours, stock, search):
    """Where the searches return different sequences, each pair must be a tie that float32 cannot break: the same
    length, and float64 log-probabilities within 1e-6 of each other. (Hypothesis 6.0.0 draws, for the seeded test
    below, two continuations 7e-12 apart, which ours and transformers' loop order differently.) A wrong search returns
    sequences whose scores differ far more; what follows the end of sentence must still be the same padding."""
    model64 = copy.deepcopy(model).double()
    per_source = ours.shape[0] // source.shape[0]
    for row in range(ours.shape[0]):
        if torch.equal(ours[row], stock[row]):
            continue
        index = row // per_source
        scores = []
        for sequence in (ours[row], stock[row]):
            ends = (sequence[1:] == EOS).nonzero()
            length = int(ends[0]) + 1 if len(ends) else sequence.shape[0] - 1
            tokens = sequence[: length + 1]
            with torch.no_grad():
                logits = model64(input_ids=source[index : index + 1], attention_mask=mask[index : index + 1],
                                 decoder_input_ids=tokens[None, :-1]).logits
            scores.append((length, logits.log_softmax(-1)[0, torch.arange(length), tokens[1:]].sum().item()))
        (length, score), (stock_length, stock_score) = scores
        assert length == stock_length and abs(score - stock_score) <= 1e-6 * max(1.0, abs(score)), (
            search, ours.tolist(), stock.tolist(), scores)
        assert torch.equal(ours[row, length + 1 :], stock[row, length + 1 :]), (search, ours.tolist(), stock.tolist())


@settings(max_examples=100, **COMMON)
@given(data=st.data())
def test_fast_generate_equals_transformers_generate(data):
    check_fast_generate_equals_transformers_generate(data)


@pytest.mark.slow
@seed(20240607)
@settings(max_examples=200, **{**COMMON, "derandomize": False})
@given(data=st.data())
def test_fast_generate_equals_transformers_generate_many_cases(data):
    """The same property over many more cases; seeded (`@seed`) rather than derandomized, so that these are
    different examples from the quick test's, and the same on every run."""
    check_fast_generate_equals_transformers_generate(data)
