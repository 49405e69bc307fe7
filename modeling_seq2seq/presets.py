"""Model presets (`configs/transformer-*.json`): the paper's base and big models (Table 3) and a tiny one."""

import inspect
import json
from pathlib import Path

from .configuration_seq2seq import Seq2SeqTransformerConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
# Written by save_pretrained next to the hyper-parameters; accepted in a preset file.
BOOKKEEPING_FIELDS = {
    "model_type", "architectures", "transformers_version", "auto_map", "custom_pipelines", "dtype", "torch_dtype",
}


def preset_path(name_or_path: str | Path) -> Path:
    """`"tiny"`, `"transformer-base"` or a path to a JSON file -> the file. A bare name is a preset's unless a file
    of that name exists (a folder named like a preset, a run's output say, does not hide the preset)."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file() or len(path.parts) > 1:
        return path
    stem = str(name_or_path) if str(name_or_path).startswith("transformer-") else f"transformer-{name_or_path}"
    return PRESET_DIR / f"{stem}.json"


def load_preset(name_or_path: str | Path, **overrides) -> Seq2SeqTransformerConfig:
    """Read a preset strictly: unknown fields and wrong types are errors that name the file and the field."""
    path = preset_path(name_or_path)
    if not path.is_file():
        available = sorted(p.stem for p in PRESET_DIR.glob("transformer-*.json"))
        raise FileNotFoundError(f"No model preset at {path} (built-in presets: {', '.join(available)}).")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a valid UTF-8 JSON file ({error}).") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields, got {type(fields).__name__}.")
    known = set(inspect.signature(Seq2SeqTransformerConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(fields) - known - BOOKKEEPING_FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}.")
    if fields.get("model_type", Seq2SeqTransformerConfig.model_type) != Seq2SeqTransformerConfig.model_type:
        raise ValueError(f"{path}: model_type is {fields['model_type']!r}, expected {Seq2SeqTransformerConfig.model_type!r}.")
    values = {k: v for k, v in fields.items() if k not in BOOKKEEPING_FIELDS}
    values.update(overrides)
    try:
        return Seq2SeqTransformerConfig(**values)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
