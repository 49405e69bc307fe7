"""The shared source+target BPE vocabulary (Section 5.1 of the paper: one BPE of ~37k tokens for en-de).

Design, chosen so that ``tokenizer.decode(tokenizer(x).input_ids, skip_special_tokens=True) == x`` for any
Python string, with no ``<unk>`` ever produced:

- No Unicode normalisation (NFC/NFKC would change some inputs, breaking the exact round trip).
- Words are split on spaces SentencePiece-style: a ``▁`` is prepended to the text and every space becomes
  ``▁`` (Metaspace), so leading, trailing and repeated spaces survive decoding.
- Characters seen in training are vocabulary entries; anything else (rare scripts, emoji, control
  characters) falls back to its UTF-8 bytes, ``<0x00>`` ... ``<0xFF>`` (the Llama/SentencePiece
  "byte fallback"), which decode back to the exact characters.
- Special-token strings inside the text (a literal ``"</s>"``) are encoded as plain text
  (``split_special_tokens=True``), so user text cannot inject an end-of-sequence.
- Limitation: a literal ``▁`` (U+2581) in the input decodes as a space.

Ids: ``<pad>``=0, ``<s>``=1 (bos and decoder start), ``</s>``=2 (eos), ``<unk>``=3, then the 256 byte
tokens, then the learned pieces. Every encoded sequence (source or ``text_target=``) ends with ``</s>``;
no ``<s>`` is added (the model prepends the decoder start token itself when shifting labels).
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .checkpointing import move_files_into, read_json_object

logger = logging.getLogger(__name__)

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, UNK_TOKEN_ID = 0, 1, 2, 3
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
SPACE_MARK = "\u2581"  # "▁"
DEFAULT_MODEL_MAX_LENGTH = 1024  # the model config's default max_position_embeddings
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(BYTE_TOKENS) + 1
# Far above any translation vocabulary; the tokenizers library's BPE trainer aborts the process (a Rust panic) on
# sizes near 2**30 and above.
MAX_VOCAB_SIZE = 2**24


def _configure_pipeline(tok: Tokenizer) -> None:
    """Attach the normaliser, pre-tokeniser, decoder and post-processor described in the module docstring."""
    tok.normalizer = normalizers.Prepend(SPACE_MARK)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_MARK, prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE_MARK, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),  # the space that stands for the prepended "▁"
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}",
        pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(EOS_TOKEN, EOS_TOKEN_ID)],
    )


def wrap_tokenizer(tok: Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` built by `train_tokenizer` as a transformers tokenizer."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,  # would rewrite " ," to "," and break the round trip
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    limit_alphabet: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train the shared BPE on `texts` (source and target sentences mixed).

    `vocab_size` counts everything (4 specials + 256 byte tokens + learned pieces); the result can be
    smaller when the data has too few pairs occurring `min_frequency` times. `limit_alphabet` caps the
    number of single characters kept (the rest use byte fallback); by default all that fit.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} "
            f"({len(SPECIAL_TOKENS)} special tokens + {len(BYTE_TOKENS)} byte-fallback tokens + 1)"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too large: at most {MAX_VOCAB_SIZE:,}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    budget = vocab_size - len(SPECIAL_TOKENS) - len(BYTE_TOKENS)  # characters + merges

    # Train without byte tokens (the trainer would count them as merges budget and could not learn them),
    # then rebuild the model with the byte tokens inserted right after the specials.
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN, byte_fallback=True))
    _configure_pipeline(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=budget + len(SPECIAL_TOKENS),
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        limit_alphabet=budget if limit_alphabet is None else min(limit_alphabet, budget),
        show_progress=False,
    )
    n_texts = 0

    def counted() -> Iterator[str]:
        nonlocal n_texts
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"train_tokenizer expects strings, got {type(text).__name__} at item {n_texts}")
            n_texts += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if n_texts == 0:
        raise ValueError("train_tokenizer got no texts to learn from")

    trained = json.loads(tok.to_str())["model"]
    # A piece learned from text that spells a byte token ("<0x41>" in a hex dump) would decode as that byte: it
    # goes, with every merge that makes it or builds on it, and the text keeps the smaller pieces it is made of.
    spelled_bytes = set(BYTE_TOKENS)
    merges = []
    for merge in trained["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        if {left, right, left + right} & spelled_bytes:
            spelled_bytes.add(left + right)
        else:
            merges.append((left, right))
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in spelled_bytes:
            vocab.setdefault(piece, len(vocab))
    final = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN, byte_fallback=True))
    _configure_pipeline(final)
    final.add_special_tokens(SPECIAL_TOKENS)
    for token, expected in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
        assert final.token_to_id(token) == expected, "special token ids must match the model config"
    logger.info("trained a BPE vocabulary of %d tokens on %d texts", final.get_vocab_size(), n_texts)
    return wrap_tokenizer(final, model_max_length=model_max_length)


def train_tokenizer_on_pairs(
    dataset, vocab_size: int, min_frequency: int = 2, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
) -> PreTrainedTokenizerFast:
    """Train the shared BPE on both columns ("source", "target") of a `datasets.Dataset`."""

    def texts() -> Iterator[str]:
        for batch in dataset.iter(batch_size=10_000):
            yield from batch["source"]
            yield from batch["target"]

    return train_tokenizer(texts(), vocab_size, min_frequency, model_max_length=model_max_length)


def train_tokenizer_from_data(
    vocab_size: int,
    output_dir: str | os.PathLike | None = None,
    *,
    min_frequency: int = 2,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | os.PathLike | None = None,
    source_lang: str = "en",
    target_lang: str = "de",
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> PreTrainedTokenizerFast:
    """Load the training split (Hub dataset, local file, or the built-in task), train, and save if asked."""
    from .data import load_parallel_data  # data imports nothing from here; keep the module import light

    data = load_parallel_data(
        dataset_name=dataset_name,
        dataset_config_name=dataset_config_name,
        train_file=train_file,
        source_lang=source_lang,
        target_lang=target_lang,
    )
    if "train" not in data:
        raise ValueError(f"no training split to learn the vocabulary from (splits found: {sorted(data)})")
    tokenizer = train_tokenizer_on_pairs(data["train"], vocab_size, min_frequency, model_max_length)
    if output_dir is not None:
        save_tokenizer(tokenizer, output_dir)
    return tokenizer


def _portable_tokenizer_config(config: dict) -> dict:
    """Rewrite a 5.x `tokenizer_config.json` into one that transformers 4.57 loads too: 5.x names its own
    `TokenizersBackend` class, which 4.57 lacks."""
    # Load-time settings that 5.x writes back when a loaded tokenizer is saved again: not the tokenizer's.
    config = {key: value for key, value in config.items() if key not in ("is_local", "local_files_only")}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # Without it 4.57 also returns token_type_ids, which `generate(**tokenizer(...))` rejects.
    config.setdefault("model_input_names", ["input_ids", "attention_mask"])
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        additional = list(config.get("additional_special_tokens") or [])
        additional += [t for t in extra if t not in additional]
        config["additional_special_tokens"] = additional
        del config["extra_special_tokens"]
    return config


STAGING_PREFIX = ".tokenizer-tmp-"  # save_tokenizer's staging folder inside the target: left only by a killed save


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike) -> list[str]:
    """`save_pretrained` into `directory`, with a 4.57-compatible `tokenizer_config.json`.

    Files are written into a temporary folder beside `directory` and moved in with `os.replace`, so a
    crash leaves either the old or the new version of each file, never a torn one. Other files in
    `directory` (a model's weights, say) are left alone. Returns the paths written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    try:
        tokenizer.save_pretrained(tmp)
        if (tmp / "tokenizer.json").is_file():  # one without (OPUS-MT's MarianTokenizer) keeps its own class name
            config_path = tmp / "tokenizer_config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config_path.write_text(
                json.dumps(_portable_tokenizer_config(config), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        # tokenizer.json first, the config last: a reader that sees the new config sees the new vocabulary.
        return move_files_into(tmp, directory, last=("tokenizer_config.json",))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _class_without_tokenizer_json(folder: Path) -> str | None:
    """The tokenizer class a folder's tokenizer_config.json names, where that class keeps its vocabulary in files
    other than tokenizer.json (None for ours, whose tokenizer.json is then missing)."""
    try:
        named = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    return named if isinstance(named, str) and named not in ("PreTrainedTokenizerFast", "TokenizersBackend") else None


def missing_vocabulary_files(folder: Path, class_name: str) -> str:
    """For an error message: which of the files that transformers' `class_name` reads its vocabulary from `folder`
    lacks (transformers' own error for a missing one can be "expected str, bytes or os.PathLike object, not
    NoneType")."""
    try:  # transformers' own lookup by name, from a module it may move: the message then goes without the list
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        files = getattr(tokenizer_class_from_name(class_name), "vocab_files_names", {})
    except Exception:
        return ""
    names = [name for name in files.values() if name != "tokenizer_config.json"]
    missing = [name for name in names if not (folder / name).exists()]
    if not missing:
        return ""
    return f" ({class_name} reads its vocabulary from {', '.join(names)}; {folder} lacks {', '.join(missing)})"


def check_tokenizer_config(file: Path, backend: Tokenizer) -> None:
    """The tokenizer_config.json beside a tokenizer.json: there (it names the special tokens, without which the
    tokenizer neither pads nor ends a sentence), a JSON object, with a numeric length limit, and naming special
    tokens of the vocabulary (transformers would add one it lacks as a new token, past the model's embeddings)."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: it names the tokenizer's special tokens (padding, end of "
                                "sentence). Pass the tokenizer.json file itself to use this package's default ones.")
    settings = read_json_object(file, "a JSON tokenizer config")
    limit = settings.get("model_max_length")
    if limit is not None and (type(limit) not in (int, float) or not limit > 0):
        raise ValueError(f"{file}: 'model_max_length' must be a number above 0, got {limit!r}.")
    for name in ("pad_token", "bos_token", "eos_token", "unk_token"):
        token = settings.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and backend.token_to_id(token) is None:
            raise ValueError(f"{file}: its {name} {token!r} is not in the vocabulary of {file.with_name('tokenizer.json')}.")


def _why_not_a_tokenizer_file(json_file: Path, error: Exception) -> str:
    """What is wrong with a file that `tokenizers` refused. Its error gives a position in its own reading of the
    structure, which points into good JSON where only the structure is wrong, and it cannot read a byte order mark."""
    try:
        data = json_file.read_bytes()
    except OSError as problem:
        return f"cannot be read ({problem})"
    if data.startswith(codecs.BOM_UTF8):
        return "starts with a UTF-8 byte order mark, which tokenizers does not read: save it without one"
    try:
        json.loads(data)
    except ValueError:
        return f"is corrupt or not a tokenizers JSON file: {error}"
    return f"is valid JSON but not a tokenizers file (tokenizers: {error})"


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved by `save_tokenizer` (a folder, or a bare `tokenizer.json` file), or one whose config
    names a transformers class that keeps its vocabulary elsewhere (OPUS-MT's MarianTokenizer), through that class."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path} does not exist")
    if path.is_file():
        json_file, folder = path, None
    else:
        json_file, folder = path / "tokenizer.json", path
        if not json_file.is_file() and (named := _class_without_tokenizer_json(path)):
            # A tokenizer transformers keeps in other files (an OPUS-MT model's SentencePiece MarianTokenizer,
            # converted by convert_marian.py): its own class loads it; never code from the folder.
            try:
                return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
            except Exception as e:
                lacking = missing_vocabulary_files(path, named)
                raise ValueError(f"could not load the {named} saved in {path}: {e}{lacking}") from e
        if not json_file.is_file():
            found = sorted(p.name for p in path.iterdir())
            raise FileNotFoundError(f"tokenizer not found: {json_file} is missing (the folder holds {found})")
    try:
        backend = Tokenizer.from_file(str(json_file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"tokenizer file {json_file} {_why_not_a_tokenizer_file(json_file, e)}") from e
    if folder is None:
        return wrap_tokenizer(backend)
    check_tokenizer_config(folder / "tokenizer_config.json", backend)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as e:
        raise ValueError(f"could not load the tokenizer saved in {folder}: {e}") from e
    return tokenizer
