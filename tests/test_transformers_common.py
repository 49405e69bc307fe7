"""transformers' own common model tests, run against our model the way transformers runs them against Marian.

Every model inside transformers passes `ModelTesterMixin` (tests/test_modeling_common.py) and, when it can generate,
`GenerationTesterMixin` (tests/generation/test_utils.py); its config passes `ConfigTester`. Those mixins are not in
the transformers wheel, so tests/hf_common/ vendors them (each file names its source). This file is the model test
file transformers would have for us, written after tests/models/marian/test_modeling_marian.py: the same tiny
config, the same inputs, Marian's model-specific tests where they apply, and a skip with its reason for every common
test that does not apply to this architecture.
"""

import contextlib
import os
import sys
import tempfile
import unittest
from unittest import mock

import pytest
import torch
import transformers
from transformers import GenerationConfig
from transformers.models.auto import modeling_auto
from transformers.testing_utils import require_torch, require_torch_fp16, torch_device

from modeling_seq2seq import (
    Seq2SeqTransformerConfig,
    Seq2SeqTransformerForConditionalGeneration,
    Seq2SeqTransformerModel,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the vendored mixins, whatever the import mode

VENDORED_FROM = "5.24.0"  # the transformers release whose tests/hf_common/ mixins these are
try:
    from hf_common.generation.test_utils import GenerationTesterMixin  # noqa: E402
    from hf_common.test_configuration_common import ConfigTester  # noqa: E402
    from hf_common.test_modeling_common import ModelTesterMixin, ids_tensor  # noqa: E402
except ImportError as error:  # the mixins follow their release's testing_utils, as transformers' own tests do
    if transformers.__version__ == VENDORED_FROM:
        raise
    pytest.skip(f"transformers' common tests are vendored from {VENDORED_FROM} and do not import under the installed "
                f"transformers {transformers.__version__} ({error}); run them with transformers=={VENDORED_FROM}",
                allow_module_level=True)


def prepare_seq2seq_inputs_dict(config, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None):
    """As `prepare_marian_inputs_dict` (including its use of the source mask for the decoder, all ones here)."""
    if attention_mask is None:
        attention_mask = input_ids.ne(config.pad_token_id)
    if decoder_attention_mask is None:
        decoder_attention_mask = decoder_input_ids.ne(config.pad_token_id)
    return {
        "input_ids": input_ids,
        "decoder_input_ids": decoder_input_ids,
        "attention_mask": attention_mask,
        "decoder_attention_mask": attention_mask,
    }


class Seq2SeqTransformerModelTester:
    """`MarianModelTester` with our config: 2 layers of width 16, 4 heads, vocabulary 99, sequences of 7."""

    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_labels=False,
        vocab_size=99,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=4,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=100,
        eos_token_id=2,
        pad_token_id=1,
        bos_token_id=0,
        decoder_start_token_id=3,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.decoder_start_token_id = decoder_start_token_id

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size).clamp(3)
        input_ids[:, -1] = self.eos_token_id  # end-of-sentence token
        decoder_input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        config = self.get_config()
        inputs_dict = prepare_seq2seq_inputs_dict(config, input_ids, decoder_input_ids)
        return config, inputs_dict

    def get_config(self):
        return Seq2SeqTransformerConfig(
            vocab_size=self.vocab_size,
            d_model=self.hidden_size,
            encoder_layers=self.num_hidden_layers,
            decoder_layers=self.num_hidden_layers,
            encoder_attention_heads=self.num_attention_heads,
            decoder_attention_heads=self.num_attention_heads,
            encoder_ffn_dim=self.intermediate_size,
            decoder_ffn_dim=self.intermediate_size,
            activation_function=self.hidden_act,
            dropout=self.hidden_dropout_prob,
            attention_dropout=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.bos_token_id,
            pad_token_id=self.pad_token_id,
            decoder_start_token_id=self.decoder_start_token_id,
        )

    def prepare_config_and_inputs_for_common(self):
        return self.prepare_config_and_inputs()

    def create_and_check_decoder_model_past_large_inputs(self, config, inputs_dict):
        """Marian's check: three new tokens decoded on top of a cache give the states of a full recomputation.

        Our decoder always attends to an encoder output (it has no stand-alone causal-LM mode), so it gets one."""
        model = Seq2SeqTransformerModel(config=config).to(torch_device).eval()
        decoder = model.get_decoder()
        encoder_states = model.get_encoder()(inputs_dict["input_ids"], attention_mask=inputs_dict["attention_mask"])[0]
        input_ids = inputs_dict["decoder_input_ids"]
        attention_mask = inputs_dict["decoder_attention_mask"]

        outputs = decoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=encoder_states, use_cache=True)
        output, cache = outputs.to_tuple()

        next_tokens = ids_tensor((self.batch_size, 3), config.vocab_size)
        next_attn_mask = ids_tensor((self.batch_size, 3), 2)
        next_input_ids = torch.cat([input_ids, next_tokens], dim=-1)
        next_attention_mask = torch.cat([attention_mask, next_attn_mask], dim=-1)

        output_from_no_past = decoder(
            next_input_ids, attention_mask=next_attention_mask, encoder_hidden_states=encoder_states
        )["last_hidden_state"]
        output_from_past = decoder(
            next_tokens, attention_mask=next_attention_mask, encoder_hidden_states=encoder_states, cache=cache
        )["last_hidden_state"]

        random_slice_idx = ids_tensor((1,), output_from_past.shape[-1]).item()
        output_from_no_past_slice = output_from_no_past[:, -3:, random_slice_idx].detach()
        output_from_past_slice = output_from_past[:, :, random_slice_idx].detach()
        self.parent.assertTrue(output_from_past_slice.shape[1] == next_tokens.shape[1])
        self.parent.assertTrue(torch.allclose(output_from_past_slice, output_from_no_past_slice, atol=1e-3))

    def check_encoder_decoder_model_standalone(self, config, inputs_dict):
        """Marian's check that `get_encoder()` / `get_decoder()` alone reproduce the full model's states.

        Marian saves and reloads them as `MarianEncoder` / `MarianDecoder` (pretrained models of their own); our
        stacks are plain modules of the one model, so they are called in place."""
        model = Seq2SeqTransformerModel(config=config).to(torch_device).eval()
        outputs = model(**inputs_dict)
        encoder_last_hidden_state = outputs.encoder_last_hidden_state
        last_hidden_state = outputs.last_hidden_state

        encoder_last_hidden_state_2 = model.get_encoder()(
            inputs_dict["input_ids"], attention_mask=inputs_dict["attention_mask"]
        )[0]
        self.parent.assertTrue((encoder_last_hidden_state_2 - encoder_last_hidden_state).abs().max().item() < 1e-3)

        last_hidden_state_2 = model.get_decoder()(
            input_ids=inputs_dict["decoder_input_ids"],
            attention_mask=inputs_dict["decoder_attention_mask"],
            encoder_hidden_states=encoder_last_hidden_state,
            encoder_attention_mask=inputs_dict["attention_mask"],
        )[0]
        self.parent.assertTrue((last_hidden_state_2 - last_hidden_state).abs().max().item() < 1e-3)


# Where transformers lists Marian's classes by name, the common tests look up which heads a class has (a base model
# has no loss; a sequence-to-sequence LM gets `labels`). Ours are listed there too while the tests run.
AUTO_MAPPING_NAMES = {
    "MODEL_MAPPING_NAMES": Seq2SeqTransformerModel,
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": Seq2SeqTransformerForConditionalGeneration,
}


@contextlib.contextmanager
def greedy_generation_defaults():
    """Models built inside get transformers' default generation settings (greedy search), as Marian's test models
    do, instead of ours (the paper's beam search, Section 6.1)."""
    init = Seq2SeqTransformerForConditionalGeneration.__init__

    def greedy_init(self, config):
        init(self, config)
        self.generation_config = GenerationConfig.from_model_config(config)

    with mock.patch.object(Seq2SeqTransformerForConditionalGeneration, "__init__", greedy_init):
        yield


@require_torch
class Seq2SeqTransformerModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (Seq2SeqTransformerModel, Seq2SeqTransformerForConditionalGeneration)
    is_encoder_decoder = True
    # The mixin dates models by the copyright line of their config file (ours has none) and spares pre-2023 ones
    # this check; this model is new, so it takes the check.
    test_can_init_all_missing_weights_before_2023 = True

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        model_type = Seq2SeqTransformerConfig.model_type
        for mapping, model_class in AUTO_MAPPING_NAMES.items():
            patcher = mock.patch.dict(getattr(modeling_auto, mapping), {model_type: model_class.__name__})
            patcher.start()
            cls.addClassCleanup(patcher.stop)
        # Tensors of width 16: one thread is ~3x faster than two (thread hand-offs dominate); restored afterwards.
        cls.addClassCleanup(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(1)

    def setUp(self):
        self.model_tester = Seq2SeqTransformerModelTester(self)
        self.config_tester = ConfigTester(self, config_class=Seq2SeqTransformerConfig)

    def test_config(self):
        self.config_tester.run_common_tests()

    # Marian's model-specific tests, where they apply.

    def test_save_load_strict(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs()
        for model_class in self.all_model_classes:
            model = model_class(config)
            with tempfile.TemporaryDirectory() as tmpdirname:
                model.save_pretrained(tmpdirname)
                model2, info = model_class.from_pretrained(tmpdirname, output_loading_info=True)
            self.assertEqual(set(info["missing_keys"]), set())

    def test_decoder_model_past_with_large_inputs(self):
        config_and_inputs = self.model_tester.prepare_config_and_inputs()
        self.model_tester.create_and_check_decoder_model_past_large_inputs(*config_and_inputs)

    def test_encoder_decoder_model_standalone(self):
        config_and_inputs = self.model_tester.prepare_config_and_inputs_for_common()
        self.model_tester.check_encoder_decoder_model_standalone(*config_and_inputs)

    @require_torch_fp16
    @pytest.mark.slow  # beam search (our default) to max_length in float16 on CPU
    def test_generate_fp16(self):
        config, input_dict = self.model_tester.prepare_config_and_inputs()
        input_ids = input_dict["input_ids"]
        attention_mask = input_ids.ne(1).to(torch_device)
        model = Seq2SeqTransformerForConditionalGeneration(config).eval().to(torch_device)
        model.half()
        model.generate(input_ids, attention_mask=attention_mask)
        model.generate(num_beams=4, do_sample=True, early_stopping=False, num_return_sequences=3)

    def test_share_encoder_decoder_embeddings(self):
        """Marian's test, first half: source and target share one embedding (Section 3.4). Our model always
        shares it (Marian's `share_encoder_decoder_embeddings=False` option has no counterpart here)."""
        config, _ = self.model_tester.prepare_config_and_inputs()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIs(model.get_encoder().embed_tokens, model.get_decoder().embed_tokens)
            self.assertIs(model.get_encoder().embed_tokens.weight, model.get_decoder().embed_tokens.weight)

    # Common tests adapted to this architecture.

    def test_generate_continue_from_past_key_values(self):
        """The upstream test under transformers' default greedy search: it calls `generate` without search settings,
        and ours default to beam search, whose returned cache holds every beam while its output holds only the best
        one, so a beam search cannot be resumed from it (for any model)."""
        with greedy_generation_defaults():
            super().test_generate_continue_from_past_key_values()

    def test_generate_compile_model_forward_fullgraph(self):
        """The upstream test under transformers' default greedy search: it checks that `generate` compiled the
        forward, which transformers does in its greedy and sampling loops, never in its beam search (our default)."""
        with greedy_generation_defaults():
            super().test_generate_compile_model_forward_fullgraph()

    def test_static_cache_no_recompile_with_smaller_length(self):
        """As `test_generate_compile_model_forward_fullgraph`: the check needs transformers' compiled greedy loop."""
        with greedy_generation_defaults():
            super().test_static_cache_no_recompile_with_smaller_length()
