#!/usr/bin/env python
"""Export a saved model to CTranslate2 (the serving path): our model -> its MarianMTModel twin -> CTranslate2.

    python scripts/export_ctranslate2.py --model_dir outputs/transformer-base --output_dir outputs/base-ct2
    python scripts/export_ctranslate2.py --model_dir ... --output_dir ... --quantization int8

The output folder holds the CTranslate2 model and a copy of the tokenizer. Translate with token strings:

    import ctranslate2
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(OUT)
    translator = ctranslate2.Translator(OUT, device="cpu", intra_threads=4)
    source = tokenizer.convert_ids_to_tokens(tokenizer("A small house.")["input_ids"])
    result = translator.translate_batch([source], beam_size=4, length_penalty=0.6, min_decoding_length=0)
    print(tokenizer.decode(tokenizer.convert_tokens_to_ids(result[0].hypotheses[0])))

`min_decoding_length=0` as in our `generate` (CTranslate2's default, 1, never ends at the first step). Greedy
translations then equal ours token for token, and so do beam translations in which no hypothesis ends before the
length limit. Where some do, the two beam searches may choose differently: CTranslate2 stops once its best beam has
ended, while transformers' search (`early_stopping=False`, ours and Marian's) goes on while a longer hypothesis could
still score higher. Other differences, all CTranslate2's own rules: it cuts a source at `max_input_length` tokens
(1024 by default; pass 0 to take it whole, up to the exported model's 4,096 positions, or max_position_embeddings if
more) and stops at `max_decoding_length` (256 by default; ours stops at max_position_embeddings); its
`repetition_penalty` and `no_repeat_ngram_size` do not count the start token `<s>`, and its `min_decoding_length`
and `no_repeat_ngram_size` mask tokens before the softmax (scores renormalised); a source of `</s>` alone gives
an empty translation. A model that ends sentences with several token ids needs `end_token=[...]` (a warning says so).

Needs `pip install ctranslate2` (the `bench` extra).
"""

import argparse
import os
import sys

from modeling_seq2seq.export import QUANTIZATIONS
from modeling_seq2seq.training import stoppable


@stoppable
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="a folder written by save_pretrained (scripts/train.py's output)")
    parser.add_argument("--output_dir", required=True, help="where to write the CTranslate2 model")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None, help="weight type (default: float32, as saved)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder or its tokenizer/ sub-folder)")
    parser.add_argument("--force", action="store_true", help="replace --output_dir if it exists")
    args = parser.parse_args(argv)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output_dir {args.output_dir!r} is a file, not a folder")
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        print("error: ctranslate2 is not installed (pip install ctranslate2)", file=sys.stderr)
        return 1
    from modeling_seq2seq.export import export_saved_model

    try:
        output = export_saved_model(args.model_dir, args.output_dir, quantization=args.quantization,
                                    tokenizer_path=args.tokenizer, force=args.force)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
