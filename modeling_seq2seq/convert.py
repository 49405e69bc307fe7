"""Port weights between our model and `transformers.MarianMTModel` (the paper architecture inside transformers).

Marian keeps separate q/k/v projections where we fuse them; everything else maps one to one. `to_marian` gives the
independent reference our parity tests and benchmarks compare against; `from_marian` runs OPUS-MT checkpoints on
our code.
"""

import os
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, MarianConfig, MarianMTModel

from .checkpointing import read_json_object, refuse_to_replace_inputs, seal_folder, staging_beside
from .tokenization import save_tokenizer
from .configuration_seq2seq import Seq2SeqTransformerConfig
from .modeling_seq2seq import Seq2SeqTransformerForConditionalGeneration

SHARED_FIELDS = (
    "vocab_size",
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "activation_function",
    "max_position_embeddings",
    "scale_embedding",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
)


def layer_renames(config) -> dict[str, str]:
    """Our parameter name -> Marian's, for the parameters that map one to one."""
    names = {"model.shared.weight": "model.shared.weight", "lm_head.weight": "lm_head.weight"}
    for stack, count, sublayers in (
        ("encoder", config.encoder_layers, ("self_attn_layer_norm", "final_layer_norm")),
        ("decoder", config.decoder_layers, ("self_attn_layer_norm", "final_layer_norm")),
    ):
        for i in range(count):
            ours, theirs = f"model.{stack}.layers.{i}", f"model.{stack}.layers.{i}"
            pairs = [(f"{ours}.{n}", f"{theirs}.{n}") for n in sublayers]
            pairs += [(f"{ours}.self_attn.out_proj", f"{theirs}.self_attn.out_proj")]
            pairs += [(f"{ours}.feed_forward.fc1", f"{theirs}.fc1"), (f"{ours}.feed_forward.fc2", f"{theirs}.fc2")]
            if stack == "decoder":
                pairs += [
                    (f"{ours}.cross_attn_layer_norm", f"{theirs}.encoder_attn_layer_norm"),
                    (f"{ours}.cross_attn.out_proj", f"{theirs}.encoder_attn.out_proj"),
                    (f"{ours}.cross_attn.q_proj", f"{theirs}.encoder_attn.q_proj"),
                ]
            for a, b in pairs:
                names[f"{a}.weight"], names[f"{a}.bias"] = f"{b}.weight", f"{b}.bias"
    return names


def fused_projections(config) -> dict[str, list[str]]:
    """Our fused projection (without .weight/.bias) -> Marian's projections it concatenates, in order."""
    fused = {}
    for stack, count in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        for i in range(count):
            prefix = f"model.{stack}.layers.{i}"
            fused[f"{prefix}.self_attn.qkv_proj"] = [f"{prefix}.self_attn.{p}_proj" for p in "qkv"]
            if stack == "decoder":
                fused[f"{prefix}.cross_attn.kv_proj"] = [f"{prefix}.encoder_attn.{p}_proj" for p in "kv"]
    return fused


def from_marian(marian: MarianMTModel) -> Seq2SeqTransformerForConditionalGeneration:
    """Our model with the weights, settings and generation defaults of a `MarianMTModel` (e.g. an OPUS-MT model)."""
    mc = marian.config
    if not mc.share_encoder_decoder_embeddings or (mc.decoder_vocab_size or mc.vocab_size) != mc.vocab_size:
        raise ValueError("from_marian needs a Marian model with one vocabulary shared by source and target.")
    shared = marian.model.shared.weight
    for stack in ("encoder", "decoder"):
        embedding = getattr(marian.model, stack).embed_tokens.weight
        if embedding.data_ptr() != shared.data_ptr() and not torch.equal(embedding, shared):
            raise ValueError(
                f"from_marian needs one embedding matrix for source and target (Section 3.4), but this Marian model's "
                f"{stack} embeddings differ from `model.shared` (transformers 5 unties them when tie_word_embeddings "
                "is False)."
            )
    bias = marian.final_logits_bias.detach().reshape(-1)
    config = Seq2SeqTransformerConfig(
        **{field: getattr(mc, field) for field in SHARED_FIELDS},
        positional_encoding_layout="split",
        layer_norm_position="post",
        output_bias=bool(bias.any()),
        init_std=mc.init_std,
    )
    model = Seq2SeqTransformerForConditionalGeneration(config).to(marian.dtype)  # loading would round to float32
    theirs = marian.state_dict()
    state = {ours: theirs[name] for ours, name in layer_renames(config).items()}
    for ours, parts in fused_projections(config).items():
        for kind in ("weight", "bias"):
            state[f"{ours}.{kind}"] = torch.cat([theirs[f"{p}.{kind}"] for p in parts], dim=0)
    if config.output_bias:
        state["lm_head.bias"] = bias
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"Weight mapping from Marian is incomplete: missing {missing}, unexpected {unexpected}.")
    model.generation_config = GenerationConfig.from_dict(marian.generation_config.to_dict())
    return model.train(marian.training)


def to_marian(model: Seq2SeqTransformerForConditionalGeneration) -> MarianMTModel:
    """The `MarianMTModel` twin of our model: same weights, same numbers (the parity tests' reference)."""
    config = model.config
    if config.layer_norm_position != "post":
        raise ValueError(f"to_marian needs layer_norm_position='post' (Marian has no pre-LN), got {config.layer_norm_position!r}.")
    if config.positional_encoding_layout != "split":
        raise ValueError(
            "to_marian needs positional_encoding_layout='split' (Marian's sinusoids put sines first), "
            f"got {config.positional_encoding_layout!r}."
        )
    if abs(config.layer_norm_eps - 1e-5) > 1e-12:
        raise ValueError(f"to_marian needs layer_norm_eps=1e-5 (Marian's), got {config.layer_norm_eps}.")
    marian_config = MarianConfig(
        **{field: getattr(config, field) for field in SHARED_FIELDS},
        forced_eos_token_id=None,
        share_encoder_decoder_embeddings=True,
    )
    marian = MarianMTModel(marian_config).to(model.dtype)  # loading would round to float32
    ours = model.state_dict()
    state = {name: ours[o] for o, name in layer_renames(config).items() if o in ours}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = ours["model.shared.weight"]
    for fused, parts in fused_projections(config).items():
        for kind in ("weight", "bias"):
            for part, chunk in zip(parts, ours[f"{fused}.{kind}"].chunk(len(parts), dim=0)):
                state[f"{part}.{kind}"] = chunk
    state["final_logits_bias"] = (
        ours["lm_head.bias"][None] if config.output_bias else torch.zeros(1, config.vocab_size, dtype=state["model.shared.weight"].dtype)
    )
    for stack in ("encoder", "decoder"):
        state[f"model.{stack}.embed_tokens.weight"] = ours["model.shared.weight"]
    missing, unexpected = marian.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "embed_positions" not in k]:
        raise RuntimeError(f"Weight mapping to Marian is incomplete: missing {missing}, unexpected {unexpected}.")
    marian.generation_config = GenerationConfig.from_dict(model.generation_config.to_dict())
    return marian.train(model.training)


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "source.spm", "vocab.json")


def copy_tokenizer(source: str, destination: str, config) -> None:
    """Save `source`'s tokenizer into `destination`, if it has one, once it is known to fit the model (`config`). A
    local folder without tokenizer files is left alone: where sentencepiece is installed, AutoTokenizer would try a
    MarianTokenizer without its vocabulary. Tokenizer files that do not load are an error, naming the folder, except
    for want of sentencepiece (OPUS-MT's tokenizer), which leaves the converted model without one, with a note."""
    from .training import check_tokenizer_matches

    if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, name)) for name in TOKENIZER_FILES):
        print(f"note: {source} has no tokenizer files; none copied")
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as error:  # TypeError: a class without its files
        if "sentencepiece" in str(error).lower():
            print(f"note: no tokenizer copied from {source} ({type(error).__name__}: {error})")
            return
        raise ValueError(f"{source}: its tokenizer files do not load ({type(error).__name__}: {error}).") from error
    check_tokenizer_matches(tokenizer, config, source)
    save_tokenizer(tokenizer, destination)  # 4.57 loads what it writes too


def load_for_conversion(model_class, source: str):
    """`model_class.from_pretrained(source)`, refusing what would be converted as random or damaged weights: a folder
    of the other format (transformers only warns, then initialises every weight afresh), weights missing from the
    file, of another shape than its config.json says, left unused by it, or not finite. A local folder of ours gets
    the checks every use of one makes (`training.load_saved_model`); a local Marian folder, its generation config
    and weight types checked as those."""
    from transformers import PretrainedConfig

    from .hub import load_reporting_random_weights
    from .training import check_generation_config, check_weight_dtypes, load_saved_model, refuse_unused_or_broken_weights

    local = os.path.isdir(source)
    if not local and (source.startswith(("/", ".", "~")) or source.count("/") != 1):
        raise FileNotFoundError(f"--input {source!r}: no such model folder (a Hub id looks like 'owner/name').")
    config_file = os.path.join(source, "config.json")
    if local and not os.path.isfile(config_file):
        raise FileNotFoundError(f"--input {source!r} has no config.json: it is not a saved model folder.")
    config = read_json_object(config_file, "a JSON model config") if local else PretrainedConfig.get_config_dict(source)[0]
    expected = model_class.config_class.model_type
    if config.get("model_type") != expected:
        raise ValueError(f"{source}: its config.json says model_type {config.get('model_type')!r}, not {expected!r}: "
                         "it is not in the format this direction of conversion reads.")
    if local and model_class is Seq2SeqTransformerForConditionalGeneration:
        return load_saved_model(source)
    if local:
        check_generation_config(Path(source))
        check_weight_dtypes(Path(source))
    try:
        model, missing, _, unused = load_reporting_random_weights(model_class, source)  # another shape raises there
    except (RuntimeError, TypeError, ValueError) as error:
        if source in str(error):
            raise
        raise ValueError(f"{config_file}: the model it describes cannot be built ({error}).") from error
    stored_once = {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"} & set(missing)
    if stored_once and getattr(model.config, "share_encoder_decoder_embeddings", False) and (
            "model.shared.weight" not in missing):
        # One matrix for source and target, saved once as model.shared (transformers 4 with safetensors); 5 leaves
        # the stacks' embeddings apart when tie_word_embeddings is False.
        for stack in (model.model.encoder, model.model.decoder):
            stack.embed_tokens.weight = model.model.shared.weight
        missing = [name for name in missing if name not in stored_once]
    if missing:
        raise ValueError(f"{source}: weights missing from its files: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         "refusing to convert partly random weights.")
    refuse_unused_or_broken_weights(source, model, unused)
    return model


def convert_folder(source: str, output_dir: str, to: str) -> None:
    """Load a saved model (Marian or ours), convert it, and save it with its tokenizer into `output_dir`."""
    if to not in ("ours", "marian"):
        raise ValueError(f"`to` must be 'ours' or 'marian', got {to!r}.")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output_dir))):
        raise FileNotFoundError(f"--output_dir {output_dir!r}: its folder {os.path.dirname(os.path.abspath(output_dir))!r} "
                                "does not exist.")
    if os.path.isdir(source):  # a local --input: the output may not hold it, nor lie inside it as a checkpoint
        refuse_to_replace_inputs(output_dir, [source], "--output_dir", earlier_output=None)
    output = os.path.abspath(output_dir)
    if os.path.isdir(output) and os.listdir(output):  # before the conversion: a new folder only, nothing replaced
        raise FileExistsError(f"--output_dir {output} exists and is not empty; choose a new --output_dir.")
    if to == "ours":
        model = from_marian(load_for_conversion(MarianMTModel, source))
    else:
        model = to_marian(load_for_conversion(Seq2SeqTransformerForConditionalGeneration, source))
    staging = str(staging_beside(output))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        copy_tokenizer(source, staging, model.config)
        seal_folder(staging)
        if os.path.exists(output):
            os.rmdir(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
