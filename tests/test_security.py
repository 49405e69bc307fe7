"""Untrusted files (issue 7): weights load from safetensors only, nothing unpickles a model file, and the code that
ships with a saved model does only maths.

Already covered elsewhere and not repeated: `test_checkpointing.py` (optimizer/trainer state through
`torch.load(weights_only=True)`, an arbitrary class refused), `test_hub.py` (the Hub folder's exact file list, its
`.py` files statically checked by `hub.check_shipped_code` and imported under an audit hook, weights in safetensors).
This file adds: a source scan of every loader in the package and the scripts, a pickle-only model folder given to
each of our loaders (with a payload that would leave a mark if it ever ran), and the code that `save_pretrained`
itself ships (what a user who uploads with `model.push_to_hub` publishes), checked independently of `hub.py`.
"""

import ast
import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from modeling_seq2seq import Seq2SeqTransformerConfig, Seq2SeqTransformerForConditionalGeneration
from modeling_seq2seq import checkpointing as ckpt

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "modeling_seq2seq"
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
MODELING_FILES = ["configuration_seq2seq.py", "decoding_seq2seq.py", "modeling_seq2seq.py", "pipeline.py"]

# `X.from_pretrained` where X reads JSON only (configs, generation configs, tokenizers): no weights, no pickle.
JSON_ONLY_LOADERS = re.compile(r"(^|\.)(AutoConfig|\w*Config|AutoTokenizer|\w*TokenizerFast|\w*Tokenizer)$")
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNPICKLING_CALLS = {"torch.jit.load", "torch.hub.load", "torch.hub.load_state_dict_from_url", "torch.package.PackageImporter"}


def dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            yield node, dotted(node.func)


# --- Source scan -----------------------------------------------------------------------------------------------------


def test_the_scan_sees_the_loaders_it_is_meant_to_check():
    assert len(SOURCES) > 15 and PACKAGE / "training.py" in SOURCES and REPO / "scripts" / "train.py" in SOURCES
    found = {name for path in SOURCES for _, name in calls(path)}
    # every saved model is loaded through hub.load_reporting_random_weights, whose class is its `model_class` argument
    assert {"torch.load", "model_class.from_pretrained"} <= found


def test_every_torch_load_is_weights_only():
    unsafe = [
        f"{path.relative_to(REPO)}:{call.lineno}"
        for path in SOURCES
        for call, name in calls(path)
        if name in ("torch.load", "torch.serialization.load") and not keyword_is_true(call, "weights_only")
    ]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_every_model_from_pretrained_is_safetensors_only():
    """Configs and tokenizers are JSON; anything else loaded with from_pretrained holds weights and must pass
    use_safetensors=True (transformers would otherwise fall back to pytorch_model.bin, a pickle)."""
    unsafe, checked = [], 0
    for path in SOURCES:
        for call, name in calls(path):
            if not name.endswith(".from_pretrained"):
                continue
            receiver = name[: -len(".from_pretrained")]
            if JSON_ONLY_LOADERS.search(receiver):
                continue
            checked += 1
            if not keyword_is_true(call, "use_safetensors"):
                unsafe.append(f"{path.relative_to(REPO)}:{call.lineno} {name}")
    assert not unsafe, f"weights loaded without use_safetensors=True: {unsafe}"
    assert checked >= 1  # hub.load_reporting_random_weights: convert, training, export, hub and viz load through it


def test_nothing_imports_a_pickle_loader_or_trusts_remote_code():
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [f"{path.name}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLING_MODULES]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UNPICKLING_MODULES:
                problems.append(f"{path.name}: from {node.module} import")
            elif isinstance(node, ast.Call):
                name = dotted(node.func)
                if name in UNPICKLING_CALLS:
                    problems.append(f"{path.name}:{node.lineno}: {name}")
                if name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") and keyword_is_true(node, "allow_pickle"):
                    problems.append(f"{path.name}:{node.lineno}: {name}(allow_pickle=True)")
                if keyword_is_true(node, "trust_remote_code"):  # our loaders run our code, never a download's
                    problems.append(f"{path.name}:{node.lineno}: {name}(trust_remote_code=True)")
    assert not problems, problems


def test_training_resume_reads_weights_and_state_through_the_safe_helpers():
    """The resume path (Trainer.load_checkpoint) reads weights with safetensors and state with weights_only."""
    import inspect

    from modeling_seq2seq.training import Trainer

    source = inspect.getsource(Trainer.load_checkpoint)
    assert "ckpt.load_safetensors_folder(folder)" in source and "ckpt.load_torch_state(" in source
    assert "torch.load" not in source and "from_pretrained" not in source


# --- A model folder whose weights are a pickle ----------------------------------------------------------------------


class Payload:
    """Unpickling this creates the file `marker`: proof that something ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tiny_model():
    torch.manual_seed(0)
    config = Seq2SeqTransformerConfig(
        vocab_size=300, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=16,
    )
    return Seq2SeqTransformerForConditionalGeneration(config).eval()


def pickle_only(folder: Path, marker: Path) -> Path:
    """Replace a saved folder's safetensors weights by a `pytorch_model.bin` carrying the payload."""
    from safetensors.torch import load_file

    state = {}
    for file in folder.glob("*.safetensors"):
        state.update(load_file(str(file)))
        file.unlink()
    state["payload"] = Payload(marker)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def quiet():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PAYLOAD-RAN"
    yield path
    assert not path.exists(), "a loader unpickled the payload"


@pytest.fixture
def pickled_model(tmp_path, marker, quiet):
    """Our model saved with its tokenizer, weights as a pickle only."""
    from modeling_seq2seq.tokenization import save_tokenizer, train_tokenizer

    folder = tmp_path / "pickled"
    tiny_model().save_pretrained(folder)
    save_tokenizer(train_tokenizer(["the cat sat on the mat"] * 5, vocab_size=300), folder)
    return pickle_only(folder, marker)


def no_safetensors(folder: Path) -> str:
    return re.escape(f"no file named model.safetensors found in directory {folder}")


def test_the_payload_is_live(tmp_path, quiet):
    """The folder the tests below refuse really would run code if unpickled (so refusing it means something)."""
    marker = tmp_path / "ran"
    tiny_model().save_pretrained(tmp_path / "m")
    pickle_only(tmp_path / "m", marker)
    torch.load(tmp_path / "m" / "pytorch_model.bin", weights_only=False)  # what an unsafe loader would do
    assert marker.exists()


def test_convert_folder_refuses_pickled_weights(pickled_model, tmp_path):
    from modeling_seq2seq.convert import convert_folder, to_marian

    with pytest.raises(OSError, match=no_safetensors(pickled_model)):
        convert_folder(str(pickled_model), str(tmp_path / "marian"), to="marian")
    marian_dir = tmp_path / "marian-pickled"
    to_marian(tiny_model()).save_pretrained(marian_dir)
    pickle_only(marian_dir, tmp_path / "PAYLOAD-RAN")
    with pytest.raises(OSError, match=no_safetensors(marian_dir)):
        convert_folder(str(marian_dir), str(tmp_path / "ours"), to="ours")
    assert not (tmp_path / "marian").exists() and not (tmp_path / "ours").exists()


def test_translate_evaluate_and_finetune_loader_refuses_pickled_weights(pickled_model):
    from modeling_seq2seq.training import load_model_and_tokenizer

    with pytest.raises(OSError, match=no_safetensors(pickled_model)):
        load_model_and_tokenizer(pickled_model, device="cpu")


def test_visualization_loader_refuses_pickled_weights(pickled_model):
    from modeling_seq2seq.viz import load_model

    with pytest.raises(OSError, match=no_safetensors(pickled_model)):
        load_model(pickled_model)


def test_export_refuses_pickled_weights(pickled_model, tmp_path):
    from modeling_seq2seq.export import export_saved_model

    with pytest.raises(OSError, match=no_safetensors(pickled_model)):
        export_saved_model(pickled_model, tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists()


def test_hub_folder_builder_refuses_pickled_weights(pickled_model, tmp_path):
    from modeling_seq2seq.hub import build_hub_folder

    with pytest.raises(OSError, match=no_safetensors(pickled_model)):
        build_hub_folder(pickled_model, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_average_checkpoints_refuses_pickled_weights(pickled_model, tmp_path):
    import shutil

    copy = shutil.copytree(pickled_model, tmp_path / "copy")
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"No *.safetensors weights in {str(pickled_model)!r}.")):
        ckpt.average_checkpoints([pickled_model, copy], tmp_path / "averaged")
    assert not (tmp_path / "averaged").exists()


def test_resume_refuses_a_complete_checkpoint_whose_weights_are_a_pickle(pickled_model, tmp_path):
    """A checkpoint can verify (its manifest lists the pickle) and still not be loaded: weights are safetensors."""
    import shutil

    folder = ckpt.write_checkpoint(tmp_path / "run", 7, lambda staging: shutil.copytree(pickled_model, staging, dirs_exist_ok=True))
    assert ckpt.resolve_resume_checkpoint("latest", tmp_path / "run") == folder  # complete, so it is chosen...
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"No *.safetensors weights in {str(folder)!r}.")):
        ckpt.load_safetensors_folder(folder)  # ...and its weights are refused


def test_safetensors_win_over_a_pickle_next_to_them(tmp_path, marker, quiet):
    from modeling_seq2seq.training import load_model_and_tokenizer
    from modeling_seq2seq.tokenization import save_tokenizer, train_tokenizer

    model = tiny_model()
    model.save_pretrained(tmp_path / "both")
    save_tokenizer(train_tokenizer(["the cat sat on the mat"] * 5, vocab_size=300), tmp_path / "both")
    torch.save({"payload": Payload(marker)}, tmp_path / "both" / "pytorch_model.bin")
    loaded, _ = load_model_and_tokenizer(tmp_path / "both", device="cpu")
    assert torch.equal(loaded.model.shared.weight, model.model.shared.weight)


# --- The code a saved model carries -------------------------------------------------------------------------------

# warnings: for a FutureWarning; enum and __future__: pipeline.py; contextvars: the kernel `generate` encodes with;
# functools: the decode step, compiled once per process
ALLOWED_IMPORTS = {"torch", "transformers", "math", "copy", "typing", "warnings", "enum", "__future__", "contextvars",
                   "functools"}
FORBIDDEN_NAMES = {"exec", "eval", "compile", "open", "__import__", "__builtins__", "globals", "breakpoint", "input"}
FORBIDDEN_ROOTS = {"os", "sys", "subprocess", "socket", "urllib", "requests", "http", "shutil", "pathlib", "pickle",
                   "importlib", "ctypes", "builtins", "io", "tempfile", "huggingface_hub"}
# Calls that run when the file is imported (module and class bodies, decorators, defaults); nothing else may.
IMPORT_TIME_CALLS = {"torch.no_grad", "PIPELINE_REGISTRY.register_pipeline", "contextvars.ContextVar"}


def import_time_calls(tree: ast.Module) -> list[str]:
    found = []

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                header = node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d]
            elif isinstance(node, ast.ClassDef):
                header = node.decorator_list + node.bases + [k.value for k in node.keywords]
                visit(node.body)
            else:
                header = [node]
            found.extend(dotted(c.func) for h in header for c in ast.walk(h) if isinstance(c, ast.Call))

    visit(tree.body)
    return found


def check_shipped_source(name: str, source: str) -> list[str]:
    problems = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name.split(".")[0] not in ALLOWED_IMPORTS]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level != 1 or f"{node.module}.py" not in MODELING_FILES:
                    problems.append(f"relative import {'.' * node.level}{node.module}")
            elif node.module.split(".")[0] not in ALLOWED_IMPORTS:
                problems.append(f"from {node.module} import")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES | FORBIDDEN_ROOTS:
            problems.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.Attribute) and (
            node.attr in {"system", "popen", "urlopen", "load", "save"} and dotted(node).startswith("torch.")
            or node.attr in {"system", "popen", "urlopen"}
        ):
            problems.append(f"line {node.lineno}: {dotted(node)}")
    problems += [f"runs {call}() at import" for call in import_time_calls(tree) if call not in IMPORT_TIME_CALLS]
    return [f"{name}: {p}" for p in problems]


def test_the_checker_catches_what_it_should():
    bad = {
        "import os\n": "import os",
        "import subprocess\n": "import subprocess",
        "from urllib.request import urlopen\n": "from urllib.request import",
        "import requests\n": "import requests",
        "x = eval('1')\n": "eval",
        "def f():\n    exec('1')\n": "exec",
        "def f():\n    return open('/etc/passwd')\n": "open",
        "import torch\ndef f():\n    return torch.load('w.bin')\n": "torch.load",
        "import math\nX = math.sqrt(2)\n": "runs math.sqrt() at import",
        "import torch\nclass A:\n    W = torch.zeros(1)\n": "runs torch.zeros() at import",
        "from .helpers import x\n": "relative import .helpers",
    }
    for source, problem in bad.items():
        assert any(problem in p for p in check_shipped_source("x.py", source)), source


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, quiet):
    folder = tmp_path_factory.mktemp("saved") / "model"
    tiny_model().save_pretrained(folder)  # the package registered the classes for auto-class code sharing
    return folder


def test_save_pretrained_ships_exactly_our_modeling_files(saved_folder):
    assert sorted(p.name for p in saved_folder.glob("*.py")) == MODELING_FILES
    assert sorted(p.name for p in saved_folder.iterdir()) == sorted(
        MODELING_FILES + ["config.json", "generation_config.json", "model.safetensors"]
    )
    for name in MODELING_FILES:  # copied unchanged from the package
        assert (saved_folder / name).read_bytes() == (PACKAGE / name).read_bytes()
    auto_map = json.loads((saved_folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_seq2seq.Seq2SeqTransformerConfig",
        "AutoModel": "modeling_seq2seq.Seq2SeqTransformerModel",
        "AutoModelForSeq2SeqLM": "modeling_seq2seq.Seq2SeqTransformerForConditionalGeneration",
    }


BASE_MODEL_PROBE = """
import sys
class BlockPackage:
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_seq2seq" or name.startswith("modeling_seq2seq."):
            raise ImportError("blocked")
sys.meta_path.insert(0, BlockPackage())
import torch
from transformers import AutoModelForSeq2SeqLM
model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
source = torch.tensor([[5, 6, 7, 2]])
assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
print(type(model).__module__.startswith("transformers_modules."), model(input_ids=source, decoder_input_ids=source).logits.sum().item())
"""


def test_a_saved_base_model_loads_as_the_generation_model_without_the_package(tmp_path):
    """A `Seq2SeqTransformerModel` folder lists both classes in `auto_map`, so that `AutoModelForSeq2SeqLM` loads it
    with remote code, its head tied to the embeddings (as a MarianModel folder loads as MarianMTModel)."""
    import subprocess
    import sys

    from modeling_seq2seq import Seq2SeqTransformerModel

    torch.manual_seed(0)
    config = Seq2SeqTransformerConfig(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1,
                                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                      decoder_ffn_dim=32)
    Seq2SeqTransformerModel(config).save_pretrained(tmp_path / "base")
    auto_map = json.loads((tmp_path / "base" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSeq2SeqLM"] == "modeling_seq2seq.Seq2SeqTransformerForConditionalGeneration"
    expected = Seq2SeqTransformerForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    source = torch.tensor([[5, 6, 7, 2]])
    with torch.no_grad():
        expected_sum = expected(input_ids=source, decoder_input_ids=source).logits.sum().item()
    (tmp_path / "probe.py").write_text(BASE_MODEL_PROBE)
    environment = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-I", str(tmp_path / "probe.py"), str(tmp_path / "base")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    remote, logits_sum = done.stdout.split()[-2:]
    assert remote == "True" and abs(float(logits_sum) - expected_sum) < 1e-4


def test_shipped_code_does_only_maths(saved_folder):
    """No exec/eval/open, no os/subprocess/socket/urllib/requests, imports only torch, transformers, math, copy,
    typing, warnings, functools and the config, and nothing runs at import beyond defining things (pipeline.py
    registers its task, as transformers' custom pipelines do)."""
    problems = []
    for path in [saved_folder / name for name in MODELING_FILES]:
        problems += check_shipped_source(path.name, path.read_text(encoding="utf-8"))
    assert not problems, problems


class MyTranslator(Seq2SeqTransformerForConditionalGeneration):
    """A user's subclass, in a module of theirs."""


def test_a_subclass_elsewhere_gets_no_auto_map_entry_for_a_file_it_does_not_ship(tmp_path):
    torch.manual_seed(0)
    model = MyTranslator(Seq2SeqTransformerConfig(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1,
                                                  encoder_attention_heads=2, decoder_attention_heads=2,
                                                  encoder_ffn_dim=32, decoder_ffn_dim=32))
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text()).get("auto_map", {})
    assert "AutoModel" not in auto_map
