"""The Transformer of "Attention Is All You Need" as a native `transformers` model.

Importing the package registers the classes with `AutoConfig`, `AutoModel` and `AutoModelForSeq2SeqLM`, and marks
them for `register_for_auto_class`, so that a saved model carries its code and loads with `trust_remote_code=True`
where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from . import pipeline  # registers the "seq2seq-translation" pipeline task
from .checkpointing import refuse_to_overwrite_foreign_code
from .cpu import cpu_vendor, mkl_runs_avx512, use_mkl_where_it_is_fast
from .configuration_seq2seq import Seq2SeqTransformerConfig
from .modeling_seq2seq import (
    Seq2SeqTransformerForConditionalGeneration,
    Seq2SeqTransformerModel,
    Seq2SeqTransformerPreTrainedModel,
)

AutoConfig.register(Seq2SeqTransformerConfig.model_type, Seq2SeqTransformerConfig, exist_ok=True)
AutoModel.register(Seq2SeqTransformerConfig, Seq2SeqTransformerModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(Seq2SeqTransformerConfig, Seq2SeqTransformerForConditionalGeneration, exist_ok=True)
if mkl_runs_avx512(cpu_vendor()):
    use_mkl_where_it_is_fast()
Seq2SeqTransformerConfig.register_for_auto_class()
for saves_code in (Seq2SeqTransformerConfig, Seq2SeqTransformerPreTrainedModel, pipeline.Seq2SeqTranslationPipeline):
    saves_code.before_saving_code = staticmethod(refuse_to_overwrite_foreign_code)
Seq2SeqTransformerModel.register_for_auto_class("AutoModel")
Seq2SeqTransformerForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = [
    "Seq2SeqTransformerConfig",
    "Seq2SeqTransformerPreTrainedModel",
    "Seq2SeqTransformerModel",
    "Seq2SeqTransformerForConditionalGeneration",
]
