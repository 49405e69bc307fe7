"""A sequence-to-sequence generation pipeline for transformers 5.x (and 4.57).

transformers 5 removed the `translation`, `text2text-generation` and `summarization` pipeline tasks. This module
gives them back for encoder-decoder models under the task name `"seq2seq-translation"`:

    >>> from transformers import pipeline
    >>> translator = pipeline("seq2seq-translation", model="user/model", trust_remote_code=True)
    >>> translator("A small house.", num_beams=4, max_new_tokens=64)
    [{'translation_text': 'Ein kleines Haus.'}]

With the `modeling_seq2seq` package imported, the task is registered in-process, so an in-memory model works too:
`pipeline("seq2seq-translation", model=model, tokenizer=tokenizer)`.

Output format (the one of the old `translation` pipeline, so that code written for 4.x keeps working):
- one string in: a list with one `{"translation_text": str}` per returned sequence (`num_return_sequences`);
- a list of strings in: a list with, per input, that dict when one sequence is returned per input, else a list of
  dicts;
- `return_tensors=True` replaces the text by `"translation_token_ids"`: the `list[int]` that `generate()` returned for
  that sequence (decoder start token included), with the padding that batching adds after the end of the sequence
  removed, so the ids do not depend on the batch the input was in.

Generation parameters (`num_beams`, `max_new_tokens`, `length_penalty`, `do_sample`, a `generation_config`, ...) are
passed to `model.generate()` unchanged, either at construction (they then apply to every call) or per call (they win,
key by key; a call's `generation_config` replaces all the construction's settings); the model's
`generation_config.json` supplies the rest. The pipeline adds no defaults of its own, so its output is
exactly `tokenizer.batch_decode(model.generate(**tokenizer(texts), **kwargs), skip_special_tokens=True)`.
`batch_size=N` pads and runs N inputs per `generate()` call. `src_lang` and `tgt_lang` are taken and unused, as 4.x's
translation pipeline did for a tokenizer without language codes.

This file is shipped to the Hub next to the model and loaded with `trust_remote_code=True`: it imports only torch,
transformers and the standard library, and runs the same on transformers 5.x and 4.57.
"""

import enum

import torch
from transformers import AutoModelForSeq2SeqLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

TASK = "seq2seq-translation"


class ReturnType(enum.Enum):
    TENSORS = 0
    TEXT = 1


class Seq2SeqTranslationPipeline(Pipeline):
    """Generate text from text with an encoder-decoder model (translation, summarisation, any text-to-text task).

    Args (per call or at construction, besides those of `transformers.Pipeline`):
        return_text: return `{"translation_text": str}` (default).
        return_tensors: return `{"translation_token_ids": list[int]}` instead.
        clean_up_tokenization_spaces: passed to `tokenizer.decode` (default False).
        truncation: passed to the tokenizer (default: no truncation).
        prefix: a string put before every input (e.g. a T5-style task prefix); default none.
        generate_kwargs: a dict of `generate()` arguments; loose keywords that are not pipeline parameters are
            `generate()` arguments too.
    """

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    # The pipeline prepares its `generate()` arguments itself: the shared logic behind this flag differs between
    # transformers 4.57 and 5.x, and its defaults (e.g. 4 beams) would make the output differ from `generate()`.
    _pipeline_calls_generate = False

    return_name = "translation"
    before_saving_code = None  # set by the installed package: refuses to write the code over a user's files

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.tokenizer is None:
            raise ValueError(f"The {TASK!r} pipeline needs a tokenizer: pass `tokenizer=` or a folder that has one.")
        if not getattr(self.model.config, "is_encoder_decoder", False) or not self.model.can_generate():
            raise ValueError(
                f"The {TASK!r} pipeline needs an encoder-decoder model that can generate; got "
                f"{type(self.model).__name__}."
            )

    def save_pretrained(self, save_directory, **kwargs):
        """transformers' `Pipeline.save_pretrained`, which copies this file into the folder before it saves the model:
        the model's own checks before saving (a config that loads again, no user's file under its code's names) run
        first, so that a refused save writes nothing."""
        validate = getattr(self.model.config, "validate_hyperparameters", None)
        if validate is not None:
            validate()
        if self.before_saving_code is not None and hasattr(self, "_registered_impl"):
            model_copies_code = getattr(self.model, "before_saving_code", None) is not None  # this package's model
            self.before_saving_code(save_directory, None if model_copies_code else ("pipeline.py",))
        return super().save_pretrained(save_directory, **kwargs)

    def _sanitize_parameters(
        self,
        return_tensors=None,
        return_text=None,
        clean_up_tokenization_spaces=None,
        truncation=None,
        prefix=None,
        generate_kwargs=None,
        src_lang=None,
        tgt_lang=None,
        **kwargs,
    ):
        # src_lang/tgt_lang: unused (see the module docstring).
        preprocess_params = {}
        if truncation is not None:
            preprocess_params["truncation"] = truncation
        if prefix is not None:
            preprocess_params["prefix"] = prefix

        forward_params = {}
        if generate_kwargs is not None or kwargs:
            call = {**(generate_kwargs or {}), **kwargs}
            # transformers' Pipeline merges a call's parameters with the construction's one level deep: without the
            # construction's generate kwargs here, a call passing any would drop them all.
            at_construction = getattr(self, "_forward_params", {}).get("generate_kwargs", {})
            forward_params["generate_kwargs"] = call if "generation_config" in call else {**at_construction, **call}

        postprocess_params = {}
        if return_tensors and return_text:
            raise ValueError("Pass at most one of `return_tensors=True` and `return_text=True`.")
        if return_tensors is not None:
            postprocess_params["return_type"] = ReturnType.TENSORS if return_tensors else ReturnType.TEXT
        elif return_text is not None:
            postprocess_params["return_type"] = ReturnType.TEXT if return_text else ReturnType.TENSORS
        if clean_up_tokenization_spaces is not None:
            postprocess_params["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        # The ends and the filler that generate() used, for taking the batch padding off returned ids.
        generation = forward_params.get("generate_kwargs", {})
        for key in ("eos_token_id", "pad_token_id"):
            value = generation.get(key, getattr(generation.get("generation_config"), key, None))
            if value is not None:
                postprocess_params[key] = value
        return preprocess_params, forward_params, postprocess_params

    def __call__(self, inputs, **kwargs):
        """Generate for one string or a list of strings; see the module docstring for the output format."""
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if isinstance(inputs, list) and not all(isinstance(text, str) for text in inputs):
            raise TypeError(f"The {TASK!r} pipeline takes a string or a list of strings.")
        if isinstance(inputs, list) and not inputs:
            return []
        result = super().__call__(inputs, **kwargs)
        # Like the 4.x translation pipeline: a list of inputs with one sequence each gives a flat list of dicts.
        if isinstance(inputs, list) and all(len(records) == 1 for records in result):
            return [records[0] for records in result]
        return result

    def preprocess(self, text, truncation=False, prefix=""):
        if not isinstance(text, str):
            raise TypeError(f"The {TASK!r} pipeline takes strings; got {type(text).__name__}.")
        encoded = self.tokenizer(prefix + text, truncation=truncation, return_tensors="pt")
        # Tokenizers may add keys the model does not take (`token_type_ids`); the encoder needs these two.
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _forward(self, model_inputs, generate_kwargs=None):
        generate_kwargs = dict(generate_kwargs or {})
        if "pad_token_id" not in generate_kwargs and self.tokenizer.pad_token_id is not None:
            generation_config = generate_kwargs.get("generation_config", self.model.generation_config)
            if getattr(generation_config, "pad_token_id", None) is None:
                generate_kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        batch_size = model_inputs["input_ids"].shape[0]
        output_ids = self.model.generate(**model_inputs, **generate_kwargs)
        if not isinstance(output_ids, torch.Tensor):  # return_dict_in_generate=True
            output_ids = output_ids.sequences
        # (batch * num_return_sequences, length) -> (batch, num_return_sequences, length), so that the pipeline's
        # un-batching hands each input all of its sequences.
        output_ids = output_ids.reshape(batch_size, output_ids.shape[0] // batch_size, *output_ids.shape[1:])
        return {"output_ids": output_ids}

    def postprocess(self, model_outputs, return_type=ReturnType.TEXT, clean_up_tokenization_spaces=False,
                    eos_token_id=None, pad_token_id=None):
        records = []
        for output_ids in model_outputs["output_ids"][0]:
            if return_type == ReturnType.TENSORS:
                records.append({f"{self.return_name}_token_ids": self._strip_batch_padding(
                    output_ids.tolist(), eos_token_id, pad_token_id)})
            else:
                text = self.tokenizer.decode(
                    output_ids,
                    skip_special_tokens=True,
                    clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                )
                records.append({f"{self.return_name}_text": text})
        return records

    def _strip_batch_padding(self, ids, eos=None, pad=None):
        """Drop what follows the first end-of-sequence token when it is only filler (pad or, as transformers' beam
        search fills with when pad_token_id is 0, more end-of-sequence tokens): batching adds it, the text lacks it.
        `eos` and `pad` are the call's own, else the model's generation config's."""
        eos = self.model.generation_config.eos_token_id if eos is None else eos
        if isinstance(eos, torch.Tensor):
            eos = eos.tolist()
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        pad = self.model.generation_config.pad_token_id if pad is None else pad
        filler = eos | {pad if pad is not None else self.tokenizer.pad_token_id}
        for position in range(1, len(ids)):
            if ids[position] in eos:
                end = position + 1
                if all(token in filler for token in ids[end:]):
                    return ids[:end]
                break
        return ids


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=Seq2SeqTranslationPipeline, pt_model=AutoModelForSeq2SeqLM, type="text"
)

__all__ = ["TASK", "Seq2SeqTranslationPipeline"]
