"""Hub sharing (issue 4): the repository folder, its model card, its code, and loading it without our package.

The helpers at the top (`make_model_dir`, `PROBE`, `run_probe`) are also used by `test_pipeline.py` and
`test_remote_code_457.py`, which load this file by path.
"""

from __future__ import annotations

import ast
import json
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PUSH_SCRIPT = REPO_ROOT / "scripts" / "push_to_hub.py"
TEMPLATE = REPO_ROOT / "model_card.md"  # passed explicitly: an installed (non-editable) package lies elsewhere

# The exact content of the repository folder; a new file must be added here on purpose.
EXPECTED_FILES = [
    "README.md",
    "config.json",
    "configuration_seq2seq.py",
    "decoding_seq2seq.py",
    "generation_config.json",
    "model.safetensors",
    "modeling_seq2seq.py",
    "pipeline.py",
    "tokenizer.json",
    "tokenizer_config.json",
]
SHIPPED_CODE = ["configuration_seq2seq.py", "decoding_seq2seq.py", "modeling_seq2seq.py", "pipeline.py"]

PAIRS = [
    ("the cat sat on the mat", "die katze sass auf der matte"),
    ("a dog ran in the park", "ein hund lief im park"),
    ("the house is small", "das haus ist klein"),
    ("the dog is small", "der hund ist klein"),
    ("a cat ran", "eine katze lief"),
    ("the park is big", "der park ist gross"),
]
# Inputs of different lengths (so batches are padded), one not seen in training.
TEXTS = ["the cat sat on the mat", "a dog ran", "the house is small", "the cat is big"]
EVAL_RESULTS = {
    "test_bleu": 27.3456789,
    "test_chrf": 55.5,
    "test_exact_match": 0.25,
    "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
    "dataset": "wmt14",
    "dataset_config": "de-en",
    "source_lang": "en",
    "target_lang": "de",
}
GREEDY = {"num_beams": 1, "max_new_tokens": 12}
SAMPLING = {"do_sample": True, "num_beams": 1, "top_k": 20, "temperature": 0.8, "max_new_tokens": 12}  # seed 0


def make_model_dir(path: Path, steps: int = 20) -> Path:
    """A small model trained for a few steps on `PAIRS` (so outputs depend on the input and end with </s>), saved
    the way training saves it, with the tokenizer, eval results, a training config and a trainer state."""
    from modeling_seq2seq import Seq2SeqTransformerConfig, Seq2SeqTransformerForConditionalGeneration
    from modeling_seq2seq.tokenization import save_tokenizer, train_tokenizer

    tokenizer = train_tokenizer([text for pair in PAIRS for text in pair], vocab_size=400, min_frequency=1)
    torch.manual_seed(0)
    config = Seq2SeqTransformerConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
    )
    model = Seq2SeqTransformerForConditionalGeneration(config)
    batch = tokenizer(
        [s for s, _ in PAIRS], text_target=[t for _, t in PAIRS], return_tensors="pt", padding=True
    )
    batch["labels"][batch["labels"] == tokenizer.pad_token_id] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.config.use_cache = False  # as the Trainer leaves it; the Hub folder must turn it back on
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    (path / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))
    (path / "training_config.yaml").write_text(f"max_steps: {steps}\nlearning_rate: 0.01\nlabel_smoothing: 0.1\n")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": steps, "epoch": float(steps)}))
    return path


def shared_model_dir(tmp_path_factory) -> Path:
    """`make_model_dir` once per test session (the three test files use the same model; it is never modified)."""
    root = tmp_path_factory.getbasetemp() / "hub-tests-shared"
    if not (root / "complete").is_file():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        make_model_dir(root / "model")
        (root / "complete").write_text("")
    return root / "model"


def load_original(model_dir: Path):
    """The model and tokenizer as the package loads them (the reference for every comparison)."""
    import modeling_seq2seq  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def reference_outputs(model, tokenizer, texts=TEXTS) -> dict:
    """Token ids of greedy and (generation-config default) beam search and of sampling from seed 0, and the logits of
    a teacher-forced step."""
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        greedy = model.generate(**encoded, **GREEDY)
        beam = model.generate(**encoded, max_new_tokens=12)
        torch.manual_seed(0)
        sampled = model.generate(**encoded, **SAMPLING)
        logits = model(**encoded, decoder_input_ids=greedy[:, :4]).logits
    return {"input_ids": encoded["input_ids"].tolist(), "greedy": greedy.tolist(), "beam": beam.tolist(),
            "sampled": sampled.tolist(), "logits": logits.tolist()}


# Runs in a fresh interpreter where `import modeling_seq2seq` is impossible (a meta-path finder refuses it, whatever
# installed it: editable finder, .pth, wheel), on transformers 5.x or 4.57. argv: folder, output JSON, texts JSON.
PROBE = textwrap.dedent(
    r'''
    import ast, importlib, json, os, sys, types

    class BlockPackage:
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_seq2seq" or name.startswith("modeling_seq2seq."):
                raise ImportError("modeling_seq2seq is blocked in this interpreter")
            return None

    sys.meta_path.insert(0, BlockPackage())
    folder, out_path, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    result = {}
    try:
        import modeling_seq2seq  # noqa: F401
        result["package_importable"] = True
    except ImportError:
        result["package_importable"] = False

    import torch
    import transformers
    from transformers.pipelines import PIPELINE_REGISTRY
    result["transformers_version"] = transformers.__version__
    result["task_is_stock"] = "seq2seq-translation" in PIPELINE_REGISTRY.get_supported_tasks()

    # --- What the shipped code does when imported: no file, network, process or file-system changes. -----------
    # First import what it imports from torch/transformers (their own start-up is not ours to audit), then import the
    # shipped files as a package under an audit hook.
    shipped = sorted(name for name in os.listdir(folder) if name.endswith(".py"))
    for name in shipped:
        tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    getattr(module, alias.name, None)
    real_folder = os.path.realpath(folder)
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)} | {real_folder}
    bad_prefixes = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.unlink", "os.chmod", "os.truncate",
                    "shutil.", "urllib.", "http.", "ftplib.", "smtplib.", "ctypes.", "pickle.", "webbrowser.")
    audit = {"on": False, "events": []}

    def hook(event, args):
        if not audit["on"]:
            return
        if event == "open":
            path, mode = args[0], args[1]
            if isinstance(path, int):
                return
            path = os.path.realpath(os.fsdecode(path))
            writing = isinstance(mode, str) and any(c in mode for c in "wax+")
            if writing or not any(path == r or path.startswith(r + os.sep) for r in roots):
                audit["events"].append(f"open {path} {mode}")
        elif event.startswith(bad_prefixes):
            audit["events"].append(event)

    sys.addaudithook(hook)
    sys.dont_write_bytecode = True
    package = types.ModuleType("shipped_code_under_audit")
    package.__path__ = [folder]
    sys.modules[package.__name__] = package
    audit["on"] = True
    for name in shipped:
        importlib.import_module(f"{package.__name__}.{name[:-3]}")
    audit["on"] = False
    result["shipped_code"] = shipped
    result["import_events"] = audit["events"]

    # --- Load and generate as a user without the package would. ----------------------------------------------
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True, use_safetensors=True).eval()
    result["model_module"] = type(model).__module__
    result["tokenizer_class"] = type(tokenizer).__name__
    output_weight, input_weight = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    result["lm_head_tied"] = output_weight.data_ptr() == input_weight.data_ptr()
    result["token_ids"] = {key: getattr(model.config, key, None)
                           for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")}
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    result["input_ids"] = encoded["input_ids"].tolist()
    with torch.no_grad():
        greedy = model.generate(**encoded, num_beams=1, max_new_tokens=12)
        result["greedy"] = greedy.tolist()
        result["beam"] = model.generate(**encoded, max_new_tokens=12).tolist()
        # transformers' loop over a fixed-size cache (4.57's wrote every step into its first slot: other tokens)
        result["static_greedy"] = model.generate(**encoded, num_beams=1, max_new_tokens=12,
                                                 cache_implementation="static").tolist()
        result["static_beam"] = model.generate(**encoded, max_new_tokens=12, cache_implementation="static").tolist()
        sampling = dict(do_sample=True, num_beams=1, top_k=20, temperature=0.8, max_new_tokens=12)  # SAMPLING
        torch.manual_seed(0)
        result["sampled"] = model.generate(**encoded, **sampling).tolist()
        from transformers import GenerationMixin

        torch.manual_seed(0)  # this transformers' own sampling loop
        result["sampled_by_transformers"] = GenerationMixin.generate(model, **encoded, **sampling).tolist()
        result["logits"] = model(**encoded, decoder_input_ids=greedy[:, :4]).logits.tolist()
    result["decoded"] = tokenizer.batch_decode(greedy, skip_special_tokens=True)
    decoding = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".decoding_seq2seq")
    result["decode_step_scripted"] = decoding.scripted_decode_step() is not None  # TorchScript found the source

    pipe = pipeline("seq2seq-translation", model=folder, trust_remote_code=True)
    result["pipeline_module"] = type(pipe).__module__
    result["pipeline"] = pipe(texts, num_beams=1, max_new_tokens=12, batch_size=3)
    if int(transformers.__version__.split(".")[0]) >= 5:
        from transformers import AutoModel

        result["auto_model_class"] = type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__
        # Saved again (after fine-tuning, say), the folder keeps the code its config names, pipeline.py included.
        resaved = os.path.join(os.path.dirname(out_path), "resaved")
        model.save_pretrained(resaved)
        tokenizer.save_pretrained(resaved)
        result["resaved_code"] = sorted(name for name in os.listdir(resaved) if name.endswith(".py"))
        again = pipeline("seq2seq-translation", model=resaved, trust_remote_code=True)
        result["resaved_pipeline"] = again(texts, num_beams=1, max_new_tokens=12, batch_size=3)
    if int(transformers.__version__.split(".")[0]) < 5:
        stock = pipeline("translation", model=folder, trust_remote_code=True)
        result["stock_pipeline_class"] = type(stock).__name__
        result["stock_translation"] = stock(texts, num_beams=1, max_new_tokens=12)
    with open(out_path, "w") as f:
        json.dump(result, f)
    '''
)


def run_probe(python: str, folder: Path, workdir: Path, texts=TEXTS, timeout: float = 600) -> dict:
    """Run `PROBE` with `python` in isolated mode (-I: no PYTHONPATH, no user site, cwd not on sys.path), offline."""
    script, out = workdir / "probe.py", workdir / "probe.json"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(workdir / "hf_home"), TOKENIZERS_PARALLELISM="false",
               PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [python, "-I", str(script), str(folder), str(out), json.dumps(texts)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def assert_matches_reference(probe: dict, reference: dict) -> None:
    assert probe["input_ids"] == reference["input_ids"]
    assert probe["greedy"] == reference["greedy"]
    assert probe["beam"] == reference["beam"]
    assert (probe["static_greedy"], probe["static_beam"]) == (reference["greedy"], reference["beam"])
    assert probe["sampled"] == probe["sampled_by_transformers"] == reference["sampled"]
    assert torch.allclose(torch.tensor(probe["logits"]), torch.tensor(reference["logits"]), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return shared_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def hub_folder(model_dir, tmp_path_factory):
    from modeling_seq2seq.hub import build_hub_folder

    out = tmp_path_factory.mktemp("hub") / "repo"
    names = build_hub_folder(model_dir, out, repo_id="someone/tiny-transformer", template=TEMPLATE)
    assert names == EXPECTED_FILES
    return out


@pytest.fixture(scope="module")
def reference(model_dir):
    return reference_outputs(*load_original(model_dir))


def test_folder_holds_exactly_the_expected_files(hub_folder, unusual_permissions):
    assert sorted(p.name for p in hub_folder.iterdir()) == EXPECTED_FILES
    assert all(p.is_file() and not p.is_symlink() for p in hub_folder.iterdir())
    assert unusual_permissions(hub_folder.parent) == []  # the weights were written by safetensors (private files)
    # No leftovers of the atomic build beside it.
    assert [p.name for p in hub_folder.parent.iterdir()] == ["repo"]


def test_config_declares_remote_code_and_pipeline(hub_folder):
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["model_type"] == "seq2seq_transformer"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_seq2seq.Seq2SeqTransformerConfig",
        "AutoModel": "modeling_seq2seq.Seq2SeqTransformerModel",
        "AutoModelForSeq2SeqLM": "modeling_seq2seq.Seq2SeqTransformerForConditionalGeneration",
    }
    assert config["custom_pipelines"] == {
        "seq2seq-translation": {
            "impl": "pipeline.Seq2SeqTranslationPipeline",
            "pt": ["AutoModelForSeq2SeqLM"],
            "type": "text",
        }
    }
    assert config["use_cache"] is True  # the training dir said False
    assert config["tie_word_embeddings"] is True
    generation = json.loads((hub_folder / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == 1 and generation["eos_token_id"] == 2
    assert generation["pad_token_id"] == 0
    tokenizer_config = json.loads((hub_folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.57 cannot load "TokenizersBackend"
    assert not isinstance(tokenizer_config.get("extra_special_tokens"), list)
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]  # 4.57: no token_type_ids


def test_weights_are_safetensors_with_the_tied_matrix_stored_once(hub_folder, model_dir):
    from safetensors import safe_open

    with safe_open(hub_folder / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        shared = f.get_tensor("model.shared.weight")
    assert "lm_head.weight" not in keys
    original, _ = load_original(model_dir)
    assert keys == set(original.state_dict()) - {"lm_head.weight"}
    assert torch.equal(shared, original.get_output_embeddings().weight)
    assert not any(p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"} for p in hub_folder.iterdir())


def test_shipped_code_is_only_our_three_files_and_imports_nothing_else(hub_folder):
    from modeling_seq2seq.hub import check_shipped_code

    assert sorted(p.name for p in hub_folder.glob("*.py")) == SHIPPED_CODE
    assert check_shipped_code(hub_folder) == SHIPPED_CODE
    import modeling_seq2seq

    package = Path(modeling_seq2seq.__file__).parent
    for name in SHIPPED_CODE:  # the shipped files are the package's, unchanged
        assert (hub_folder / name).read_bytes() == (package / name).read_bytes()
    # An independent reading of the imports: torch, transformers, a few standard modules, and each other.
    allowed = {"torch", "transformers", "__future__", "math", "typing", "enum", "dataclasses", "collections",
               "functools", "itertools", "warnings", "copy", "abc", "numbers", "operator", "types", "contextlib",
               "contextvars"}
    for name in SHIPPED_CODE:
        for node in ast.walk(ast.parse((hub_folder / name).read_text())):
            if isinstance(node, ast.Import):
                assert {a.name.split(".")[0] for a in node.names} <= allowed, (name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.level == 1 and f"{node.module}.py" in SHIPPED_CODE, (name, node.module)
                else:
                    assert node.module.split(".")[0] in allowed, (name, node.module)
            elif isinstance(node, ast.Name):
                assert node.id not in {"exec", "eval", "compile", "open", "__import__"}, (name, node.lineno)


@pytest.mark.parametrize(
    "source, problem",
    [
        ("import os\n", "imports os"),
        ("import subprocess\n", "imports subprocess"),
        ("from urllib.request import urlopen\n", "imports from urllib.request"),
        ("x = eval('1')\n", "uses eval"),
        ("exec('x = 1')\n", "uses exec"),
        ("data = open('/etc/passwd').read()\n", "uses open"),
        ("import torch\nstate = torch.load('w.bin')\n", "uses torch.load"),
        ("from transformers.utils.hub import cached_file\n", "imports from transformers.utils.hub"),
        ("from .sub.helpers import f\n", "relative import .sub.helpers"),
        ("import builtins\nbuiltins.__import__('os')\n", "imports builtins"),
    ],
)
def test_code_check_rejects_unsafe_code(tmp_path, source, problem):
    from modeling_seq2seq.hub import UnsafeRemoteCodeError, check_shipped_code

    (tmp_path / "modeling_seq2seq.py").write_text("import torch\n" + source)
    with pytest.raises(UnsafeRemoteCodeError, match=problem.replace(".", r"\.")):
        check_shipped_code(tmp_path)


def test_code_check_rejects_an_extra_file(tmp_path):
    from modeling_seq2seq.hub import UnsafeRemoteCodeError, check_shipped_code

    (tmp_path / "helpers.py").write_text("import math\n")
    with pytest.raises(UnsafeRemoteCodeError, match="helpers.py: not one of the shipped code files"):
        check_shipped_code(tmp_path)


def test_model_card_metadata_and_content(hub_folder):
    from huggingface_hub import ModelCard

    card = ModelCard.load(hub_folder / "README.md")
    data = card.data.to_dict()
    assert data["language"] == ["en", "de"]
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "translation"
    assert data["datasets"] == ["wmt14"]
    assert {"translation", "custom_code", "attention-is-all-you-need"} <= set(data["tags"])
    [entry] = data["model-index"]
    assert entry["name"] == "tiny-transformer"
    [result] = entry["results"]
    assert result["task"]["type"] == "translation"
    assert result["dataset"] == {"name": "wmt14", "type": "wmt14", "config": "de-en", "split": "test"}
    scores = {m["type"]: m["value"] for m in result["metrics"]}
    assert scores == {"bleu": 27.3457, "chrf": 55.5, "exact_match": 0.25}
    text = card.text
    assert "{{" not in text and "{%" not in text  # every placeholder filled
    assert 'AutoModelForSeq2SeqLM.from_pretrained("someone/tiny-transformer", trust_remote_code=True)' in text
    assert 'pipeline("seq2seq-translation", model="someone/tiny-transformer", trust_remote_code=True)' in text
    assert "| Model width (d_model) | 32 |" in text and "| Layers (N) | 2 |" in text
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0" in text
    assert "| BLEU | 27.35 |" in text and "| Exact match | 25.00% |" in text
    assert "trained to translate **en → de** on `wmt14` (de-en)." in text
    assert "| `learning_rate` | `0.01` |" in text and "Trained for 20 optimiser steps" in text
    assert "## Intended use and limitations" in text and "vaswani2017attention" in text


def test_the_cards_prose_follows_the_model_and_its_tokenizer(model_dir, tmp_path):
    """The card's sentences on the blocks and the tokenizer come from the config and the tokenizer (they were fixed
    text: "post-LayerNorm" for a pre-LN model, "BPE ... `<pad>`=0, `<s>`=1" for a converted OPUS-MT model's)."""
    from huggingface_hub import ModelCard
    from modeling_seq2seq import Seq2SeqTransformerConfig, Seq2SeqTransformerForConditionalGeneration
    from modeling_seq2seq.export import synthetic_tokenizer
    from modeling_seq2seq.hub import build_hub_folder
    from modeling_seq2seq.tokenization import save_tokenizer

    build_hub_folder(model_dir, tmp_path / "out", template=TEMPLATE)
    text = " ".join(ModelCard.load(tmp_path / "out" / "README.md").text.split())
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert "paper: post-LayerNorm residual blocks" in text
    assert "one embedding matrix shared by the encoder, the decoder and the output projection" in text
    assert (f"The tokenizer is a shared source+target BPE of {vocab:,} tokens with byte fallback (no `<unk>` for unseen "
            "characters): `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3; the decoder starts from id 1 (`<s>`).") in text
    other = tmp_path / "other"
    config = Seq2SeqTransformerConfig.from_pretrained(model_dir, layer_norm_position="pre")
    Seq2SeqTransformerForConditionalGeneration(config).save_pretrained(other)
    save_tokenizer(synthetic_tokenizer(vocab), other)  # word level, the same special ids
    build_hub_folder(other, tmp_path / "out2", template=TEMPLATE)
    text = " ".join(ModelCard.load(tmp_path / "out2" / "README.md").text.split())
    assert "paper: pre-LayerNorm (the paper's are post-LayerNorm) residual blocks" in text
    assert f"The tokenizer is a shared source+target WordLevel of {vocab:,} tokens: `<pad>`=0" in text
    assert f"| Vocabulary | {vocab:,} (shared WordLevel) |" in text and "byte fallback" not in text


def test_model_card_without_eval_results(model_dir, tmp_path):
    import shutil

    from huggingface_hub import ModelCard
    from modeling_seq2seq.hub import build_hub_folder

    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    for name in ("eval_results.json", "training_config.yaml", "trainer_state.json"):
        (bare / name).unlink()
    # A generation config that leaves the decoding settings to transformers (a converted OPUS-MT model's, say).
    generation = json.loads((bare / "generation_config.json").read_text())
    for key in ("num_beams", "length_penalty", "max_length"):
        generation.pop(key, None)
    (bare / "generation_config.json").write_text(json.dumps(generation))
    build_hub_folder(bare, tmp_path / "out", template=TEMPLATE)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    data = card.data.to_dict()
    assert "model-index" not in data and "datasets" not in data and "language" not in data
    assert "No evaluation results were saved with this model." in card.text
    assert "{{" not in card.text and "Trained for" not in card.text
    assert "None" not in card.text and "num_beams=1" in card.text
    assert "beam size 1, length penalty\n1.0, maximum length 20 new tokens (transformers' default)" in card.text
    # With no language pair known, the evaluate command names none (it said en and de, whatever the model's pair).
    assert "--test_file\ntest.jsonl` (BLEU and chrF" in card.text and "--source_lang" not in card.text
    (bare / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": 256}))
    build_hub_folder(bare, tmp_path / "out2", template=TEMPLATE)
    assert "maximum length 256 new tokens;" in ModelCard.load(tmp_path / "out2" / "README.md").text
    # A checkpoint of train.py's keeps its run's language pair in trainer_state.json (an average, through the
    # checkpoints averaged_from.json names): the card's language and command use it (they were empty, and en/de).
    (bare / "trainer_state.json").write_text(json.dumps({"step": 40, "config": {"source_lang": "en", "target_lang": "fr"}}))
    build_hub_folder(bare, tmp_path / "out3", template=TEMPLATE)
    card = ModelCard.load(tmp_path / "out3" / "README.md")
    assert card.data.to_dict()["language"] == ["en", "fr"] and "--source_lang en --target_lang fr" in card.text
    # train.py's trainer_state.json says "step" (not "global_step") and "elapsed_s" (the card said "in  minutes").
    assert "Trained for 40 optimiser steps." in card.text
    (bare / "trainer_state.json").write_text(json.dumps({"step": 40, "elapsed_s": 90.0, "config": {
        "source_lang": "en", "target_lang": "fr"}}))
    build_hub_folder(bare, tmp_path / "out3b", template=TEMPLATE)
    assert "Trained for 40 optimiser steps in 1.5 minutes." in ModelCard.load(tmp_path / "out3b" / "README.md").text
    # ... and its data: the card named none, and its examples were another task's.
    (bare / "trainer_state.json").write_text(json.dumps({"step": 40, "config": {
        "source_lang": "en", "target_lang": "de", "dataset_name": None, "dataset_config_name": None, "train_file": None}}))
    build_hub_folder(bare, tmp_path / "out4", template=TEMPLATE)
    card = ModelCard.load(tmp_path / "out4" / "README.md")
    assert "the built-in English→German number-words task" in card.text and "The house is small." not in card.text
    # An average of checkpoints (average_checkpoints.py's output: no trainer state, averaged_from.json) says so, with
    # the last checkpoint's step (its card said nothing of either).
    (bare / "trainer_state.json").unlink()
    (bare / "averaged_from.json").write_text(json.dumps({"checkpoints": [f"/runs/x/checkpoint-{step}" for step in (
        40, 30)], "run": {"source_lang": "en", "target_lang": "de"}}))  # as --checkpoints listed them
    build_hub_folder(bare, tmp_path / "out5", template=TEMPLATE)
    card = ModelCard.load(tmp_path / "out5" / "README.md")
    assert "Trained for 40 optimiser steps. The weights are the average of the last 2 checkpoints" in card.text
    assert card.data.to_dict()["language"] == ["en", "de"]


@pytest.mark.parametrize(
    "results, expected",
    [
        ({"dataset": "builtin-number-words"}, (None, "builtin-number-words", None)),
        ({"dataset": "wmt14/de-en"}, ("wmt14", "wmt14", "de-en")),
        ({"dataset": "wmt/wmt14/de-en"}, ("wmt/wmt14", "wmt/wmt14", "de-en")),
        ({"dataset": "Helsinki-NLP/opus_books"}, ("Helsinki-NLP/opus_books", "Helsinki-NLP/opus_books", None)),
        ({"dataset_name": "wmt16", "dataset_config_name": "ro-en"}, ("wmt16", "wmt16", "ro-en")),
        ({"dataset": "/data/pairs/train.jsonl"}, (None, "train.jsonl", None)),
        ({"dataset": "data/train.tsv"}, (None, "train.tsv", None)),
        ({"dataset": "corpora/wmt/train.jsonl"}, (None, "train.jsonl", None)),  # a local path, not NAME/CONFIG
        ({"dataset": "corpora/Train.TSV.gz"}, (None, "Train.TSV.gz", None)),
        # What train.py writes now: the local file said to be one, whatever its shape (a Moses prefix here).
        ({"dataset": "corpora/wmt/train", "train_file": "corpora/wmt/train"}, (None, "train", None)),
        ({}, (None, None, None)),
    ],
)
def test_dataset_of_the_eval_results(results, expected):
    """`scripts/train.py` writes "builtin-number-words", a file path or "NAME[/CONFIG]"; only Hub ids are metadata."""
    from modeling_seq2seq.hub import _dataset_info

    info = _dataset_info(results)
    assert (info["id"], info["type"], info["config"]) == expected


def test_model_card_from_the_training_scripts_eval_results(model_and_tokenizer_for_card):
    """eval_results.json as `scripts/train.py` writes it: built-in task, exact match as a fraction, run summary."""
    from huggingface_hub import ModelCard
    from modeling_seq2seq.hub import render_model_card

    model, tokenizer = model_and_tokenizer_for_card
    results = {
        "step": 1500, "stop_reason": "max_steps", "skipped_steps": 0, "train_time_s": 512.3,
        "dataset": "builtin-number-words", "source_lang": "en", "target_lang": "de", "num_beams": 4,
        "averaged_checkpoints": ["checkpoint-1000", "checkpoint-1500"], "test_bleu": 97.123, "test_chrf": 99.01,
        "test_exact_match": 0.996, "bleu_signature": "nrefs:1|eff:yes", "chrf_signature": "nrefs:1|nc:6",
        "test_samples": 500,
    }
    text = render_model_card(model, tokenizer, template=TEMPLATE, repo_id="me/numbers",
                             eval_results=results, training={"global_step": 1500, "train_minutes": 8.5,
                                                             "stop_reason": "max_steps", "averaged_checkpoints": 2})
    card = ModelCard(text)
    data = card.data.to_dict()
    assert "datasets" not in data  # the built-in task is not a Hub dataset
    metrics = {m["type"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"bleu": 97.123, "chrf": 99.01, "exact_match": 0.996}
    assert "on the built-in English→German number-words task." in card.text
    assert '"one thousand, two hundred and five"' in card.text and "The house is small." not in card.text
    assert "| Exact match | 99.60% |" in card.text and "| BLEU | 97.12 |" in card.text
    assert "(500 sentences), en → de, beam size 4:" in card.text
    assert "Trained for 1500 optimiser steps in 8.5 minutes (stopped by: max_steps)." in card.text
    assert "average of the last 2 checkpoints" in card.text
    assert "BLEU signature: `nrefs:1|eff:yes`. chrF signature: `nrefs:1|nc:6`." in card.text
    assert "Test split of the built-in" in card.text

    # Trained with a test file of its own: the card names that file as the test set (it named the training file).
    local = {**results, "dataset": "data/fr/train.jsonl", "train_file": "data/fr/train.jsonl",
             "test_file": "data/fr/test.jsonl", "target_lang": "fr"}
    card = ModelCard(render_model_card(model, tokenizer, template=TEMPLATE, repo_id="me/fr", eval_results=local))
    assert "Test set: local data (`test.jsonl`) (500 sentences), en → fr" in card.text
    assert "on local data (`train.jsonl`)" in card.text
    [result] = card.data.to_dict()["model-index"][0]["results"][:1]
    assert result["dataset"]["name"] == "test.jsonl" and result["dataset"]["split"] == "test"


@pytest.fixture(scope="module")
def model_and_tokenizer_for_card(model_dir):
    return load_original(model_dir)


def test_build_is_atomic_and_refuses_to_clobber(model_dir, hub_folder, tmp_path):
    import shutil

    from modeling_seq2seq.hub import build_hub_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # a folder of other files is not replaced, even when asked to
        with pytest.raises(ValueError, match=r"not an earlier output of this command \(one with README.md and "
                                             r"configuration_seq2seq.py and no sub-folders; it holds keep.txt\)"):
            build_hub_folder(model_dir, out, overwrite=overwrite, template=TEMPLATE)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    repository = tmp_path / "repository"  # a README.md is no sign of an earlier Hub folder: any repository has one
    (repository / "src").mkdir(parents=True)
    for name in ("README.md", "config.json", "src/main.py"):
        (repository / name).write_text(name)
    with pytest.raises(ValueError, match=r"it holds README.md, config.json, src/\)"):
        build_hub_folder(model_dir, repository, overwrite=True, template=TEMPLATE)
    assert (repository / "src" / "main.py").is_file()
    shutil.rmtree(repository)
    (out / "keep.txt").unlink()
    assert build_hub_folder(model_dir, out, template=TEMPLATE) == EXPECTED_FILES
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="not empty"):  # an earlier output: replaced when asked to
        build_hub_folder(model_dir, out, template=TEMPLATE)

    # A build that fails half-way (bad eval_results.json) leaves the previous folder and no temporary folder.

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "eval_results.json").write_text("{not json")
    with pytest.raises(ValueError, match="eval_results.json is not valid JSON"):
        build_hub_folder(broken, out, overwrite=True, template=TEMPLATE)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]
    # Values of the wrong type would reach the card as they are, or drop a metric silently.
    results = json.loads((model_dir / "eval_results.json").read_text())
    for key, value, what in [("test_samples", -3, "a whole number, 0 or more"), ("test_bleu", "x", "a finite number"),
                             ("test_chrf", float("nan"), "a finite number"), ("source_lang", ["x"], "text"),
                             ("averaged_checkpoints", "checkpoint-8", "a list of checkpoint folders")]:
        (broken / "eval_results.json").write_text(json.dumps({**results, key: value}))
        with pytest.raises(ValueError, match=re.escape(f"{broken / 'eval_results.json'}: {key!r} must be {what}, got")):
            build_hub_folder(broken, out, overwrite=True, template=TEMPLATE)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier

    assert build_hub_folder(model_dir, out, overwrite=True, template=TEMPLATE) == EXPECTED_FILES  # an earlier output
    assert sorted(p.name for p in out.iterdir()) == EXPECTED_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]
    assert (out / "model.safetensors").read_bytes() == (hub_folder / "model.safetensors").read_bytes()

    with pytest.raises(ValueError, match="must not be inside the model folder"):
        build_hub_folder(model_dir, model_dir / "hub")
    broken_template = tmp_path / "broken.md"
    broken_template.write_text("# {{ model_name }}\n\n{{ metrics | \n")
    with pytest.raises(ValueError, match=rf"{broken_template}, line \d+: not a valid model card template"):
        build_hub_folder(model_dir, tmp_path / "card", template=broken_template)
    # The other way round: replacing an output folder that holds the model folder would delete the model.
    with pytest.raises(ValueError, match="holds the input"):
        build_hub_folder(model_dir, model_dir.parent, overwrite=True)
    assert (model_dir / "model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        build_hub_folder(tmp_path / "nowhere", tmp_path / "x")


def test_overwrite_never_replaces_the_working_directory(model_dir, tmp_path, monkeypatch, capsys):
    """`--dry_run . --overwrite` would replace the folder the user works in, whatever it holds."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "notes.txt").write_text("mine")
    monkeypatch.chdir(project / "src")
    for out in (".", ".."):
        status, captured = _run_main(
            ["--model_dir", str(model_dir), "--repo_id", "someone/tiny", "--dry_run", out, "--overwrite"], capsys
        )
        assert status == 1 and "working directory" in captured.err and "Traceback" not in captured.err
    assert sorted(p.name for p in project.rglob("*")) == ["notes.txt", "src"]


def test_loads_and_generates_identically_where_the_package_cannot_be_imported(hub_folder, reference, tmp_path):
    probe = run_probe(sys.executable, hub_folder, tmp_path)
    assert probe["package_importable"] is False  # the probe really ran without our package
    assert probe["transformers_version"].startswith("5.")
    assert probe["task_is_stock"] is False  # our task name collides with no stock task
    assert probe["model_module"].startswith("transformers_modules.")
    assert probe["tokenizer_class"] in {"PreTrainedTokenizerFast", "TokenizersBackend"}
    assert probe["lm_head_tied"] is True
    assert_matches_reference(probe, reference)
    assert probe["decode_step_scripted"] is True
    assert probe["shipped_code"] == SHIPPED_CODE
    assert probe["import_events"] == []  # importing the shipped code opened no file, socket or process
    assert probe["pipeline_module"].startswith("transformers_modules.")
    assert [r["translation_text"] for r in probe["pipeline"]] == probe["decoded"]
    assert any(text.strip() for text in probe["decoded"])
    assert probe["auto_model_class"] == "Seq2SeqTransformerModel"
    assert probe["resaved_code"] == SHIPPED_CODE and probe["resaved_pipeline"] == probe["pipeline"]


def test_a_folder_saved_by_training_runs_the_pipeline_where_the_package_cannot_be_imported(model_dir, reference, tmp_path):
    """`save_pretrained` of our model (what train.py writes) names the pipeline in config.json, as the Hub folder
    does: `pipeline("seq2seq-translation", model=folder, trust_remote_code=True)` raised "Unknown task" there."""
    script = PROBE[:PROBE.index("result = {}")] + textwrap.dedent(
        """
        from transformers import pipeline
        translations = pipeline("seq2seq-translation", model=folder, trust_remote_code=True)(texts, **json.loads(sys.argv[4]))
        with open(out_path, "w") as f:
            json.dump([r["translation_text"] for r in translations], f)
        """)
    (tmp_path / "probe.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "probe.py"), str(model_dir), str(tmp_path / "out.json"),
                           json.dumps(TEXTS), json.dumps(GREEDY)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, tokenizer = load_original(model_dir)
    expected = tokenizer.batch_decode(torch.tensor(reference["greedy"]), skip_special_tokens=True)
    assert json.loads((tmp_path / "out.json").read_text()) == expected and any(expected)


def test_dry_run_cli_prints_the_file_list(model_dir, tmp_path, capsys):
    out = tmp_path / "dry"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, str(PUSH_SCRIPT), "--model_dir", str(model_dir), "--repo_id", "someone/tiny",
         "--dry_run", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == EXPECTED_FILES
    assert "not uploaded" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == EXPECTED_FILES
    # A second dry run into the same, now full, folder refuses with one line and leaves it alone.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    status, captured = _run_main(
        ["--model_dir", str(model_dir), "--repo_id", "someone/tiny", "--dry_run", str(out)], capsys
    )
    assert status == 1
    [line] = captured.err.strip().splitlines()
    assert line.startswith("error: ") and "not empty" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    status, captured = _run_main(
        ["--model_dir", str(model_dir), "--repo_id", "someone/tiny", "--dry_run", str(out), "--overwrite"], capsys
    )
    assert status == 0 and sorted(p.name for p in out.iterdir()) == EXPECTED_FILES


def test_upload_offline_fails_with_one_line(model_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_TOKEN="hf_not_a_real_token", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, str(PUSH_SCRIPT), "--model_dir", str(model_dir), "--repo_id", "someone/tiny"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: cannot upload: offline mode is on (HF_HUB_OFFLINE=1); unset it to push to the Hub"
    ]


def _run_main(argv, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("push_to_hub_script", PUSH_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    status = script.main(argv)
    return status, capsys.readouterr()


def test_upload_to_unreachable_endpoint_fails_with_one_line(hub_folder, monkeypatch):
    from huggingface_hub import constants
    from modeling_seq2seq.hub import HubUploadError, push_folder

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # loopback, nothing listens: refused at once
    with pytest.raises(HubUploadError) as error:
        push_folder(hub_folder, "someone/tiny", token="hf_not_a_real_token")
    [line] = str(error.value).splitlines()
    assert line.startswith("cannot upload: the Hub at http://127.0.0.1:9 is unreachable (")
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no chained traceback


def test_upload_without_token_fails_before_any_request(model_dir, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)

    def no_request(*args, **kwargs):
        raise AssertionError("no request may be made without a token")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_request)
    status, captured = _run_main(["--model_dir", str(model_dir), "--repo_id", "someone/tiny"], capsys)
    assert status == 1
    assert captured.err.strip().splitlines() == [
        "error: cannot upload: no Hugging Face token; run `hf auth login` or set HF_TOKEN"
    ]


def test_upload_calls_create_repo_and_upload_folder_with_the_built_folder(model_dir, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    calls, existing = {}, {"private": True}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def repo_info(self, repo_id, **kwargs):
        return huggingface_hub.hf_api.ModelInfo(id=repo_id, private=existing["private"])

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        calls["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        return "https://huggingface.co/someone/tiny/commit/0123"

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    arguments = ["--model_dir", str(model_dir), "--repo_id", "someone/tiny", "--private", "--token", "hf_x",
                 "--commit_message", "first model"]
    status, captured = _run_main(arguments, capsys)
    assert status == 0, captured.err
    assert calls["create_repo"] == ("someone/tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["upload_folder"]["repo_id"] == "someone/tiny"
    assert calls["upload_folder"]["commit_message"] == "first model"
    # The repository's content becomes the folder's: an earlier upload's files that it lacks go in the same commit.
    assert calls["upload_folder"]["delete_patterns"] == "*"
    assert calls["files"] == EXPECTED_FILES
    assert not Path(calls["upload_folder"]["folder_path"]).exists()  # the temporary folder is cleaned up
    assert "Uploaded: https://huggingface.co/someone/tiny/commit/0123" in captured.out
    # --private asked of an existing public repository (create_repo leaves it public): refused before uploading.
    existing["private"], calls = False, {}
    status, captured = _run_main(arguments, capsys)
    assert status == 1 and "upload_folder" not in calls
    assert "someone/tiny exists and is public: --private does not change an existing repository's visibility" in captured.err
    # Without --private, create_repo is left to its owner's default (an organisation's may be private; False was public).
    calls = {}
    assert _run_main([a for a in arguments if a != "--private"], capsys)[0] == 0
    assert calls["create_repo"] == ("someone/tiny", {"private": None, "exist_ok": True, "repo_type": "model"})


@pytest.mark.parametrize("repo_id, message", [("no-slash", "must look like USER/NAME"),
                                               ("me/bad name!", "not a Hub repository name")])
def test_bad_repo_id_is_a_usage_error(model_dir, capsys, tmp_path, repo_id, message):
    with pytest.raises(SystemExit) as exit_info:  # a usage error: nothing is written (a regression writes in tmp_path)
        _run_main(["--model_dir", str(model_dir), "--repo_id", repo_id, "--dry_run", str(tmp_path / "unused")], capsys)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    (["--license", "my license"], "--license must be a license id such as apache-2.0, mit or other, got 'my license'"),
    (["--datasets", "/data/train.jsonl"], "--datasets: '/data/train.jsonl' is not a Hub dataset id"),
    (["--datasets", "bad id!!"], "--datasets: 'bad id!!' is not a Hub dataset id"),
    (["--datasets", "data/train.jsonl"], "--datasets: 'data/train.jsonl' is not a Hub dataset id"),  # a valid repo id
    (["--datasets", "data/train.parquet"], "--datasets: 'data/train.parquet' is not a Hub dataset id"),
    (["--datasets", "Data/TRAIN.JSONL.gz"], "--datasets: 'Data/TRAIN.JSONL.gz' is not a Hub dataset id"),
    (["--tags", "nmt", " "], "--tags: a tag is empty"),
])
def test_card_metadata_options_are_checked(model_dir, capsys, tmp_path, option, message):
    """They were written into the card's metadata as given (a local path among the datasets, "license: my license")."""
    with pytest.raises(SystemExit) as exit_info:
        _run_main(["--model_dir", str(model_dir), "--repo_id", "me/tiny", "--dry_run", str(tmp_path / "out"), *option],
                  capsys)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_data_column_that_is_no_language_code_stays_out_of_the_metadata(model_dir, tmp_path):
    from huggingface_hub import ModelCard
    from modeling_seq2seq.hub import render_model_card
    from modeling_seq2seq.tokenization import load_tokenizer
    from modeling_seq2seq.training import load_saved_model

    model, tokenizer = load_saved_model(model_dir), load_tokenizer(model_dir)
    for pair, expected in ((("english", "french"), None), (("zh-Hans", "pt_BR"), ["zh-Hans", "pt_BR"])):
        card = render_model_card(model, tokenizer, template=TEMPLATE,
                                 eval_results={"source_lang": pair[0], "target_lang": pair[1]})
        (tmp_path / "README.md").write_text(card)
        loaded = ModelCard.load(tmp_path / "README.md")
        assert loaded.data.to_dict().get("language") == expected
        assert f"trained to translate **{pair[0]} → {pair[1]}**" in loaded.text


@pytest.mark.parametrize(
    "status, expected",
    [
        (401, "cannot upload to someone/tiny: the Hub refused the token (HTTP 401); check it has write access"),
        (403, "cannot upload to someone/tiny: the Hub refused the token (HTTP 403); check it has write access"),
        (500, "cannot upload to someone/tiny: the Hub answered HTTP 500: 500 Server Error"),
    ],
)
def test_upload_refused_by_the_hub_fails_with_one_line(hub_folder, monkeypatch, status, expected):
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError
    from modeling_seq2seq.hub import HubUploadError, push_folder

    def refuse(self, repo_id, **kwargs):
        error = HfHubHTTPError.__new__(HfHubHTTPError)  # as raised for an HTTP error answer
        error.args = (f"{status} {'Client' if status < 500 else 'Server'} Error\nmore details",)
        error.response = SimpleNamespace(status_code=status)
        raise error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    with pytest.raises(HubUploadError) as error:
        push_folder(hub_folder, "someone/tiny", token="hf_x")
    assert str(error.value) == expected


def test_weights_that_do_not_fit_are_not_published(model_dir, tmp_path):
    import shutil

    from modeling_seq2seq.hub import build_hub_folder
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(model_dir, damaged)
    state = load_file(damaged / "model.safetensors")
    del state["model.decoder.layers.0.feed_forward.fc1.weight"]
    save_file(state, damaged / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: \['model\.decoder\.layers\.0\.feed_forward\.fc1\.weight'\]"):
        build_hub_folder(damaged, tmp_path / "out", template=TEMPLATE)
    assert not (tmp_path / "out").exists()


def test_training_recipe_falls_back_to_what_train_py_records(tmp_path):
    from modeling_seq2seq.hub import _training_recipe

    results = {"training_config": {"warmup_steps": 300, "label_smoothing": 0.0, "max_time_minutes": None}}
    (tmp_path / "training_config.yaml").write_text("")  # present but empty: not a recipe
    recipe = _training_recipe(tmp_path, results)
    assert recipe["settings"] == {"warmup_steps": 300, "label_smoothing": 0.0} and recipe["settings_file"] == "eval_results.json"
    (tmp_path / "training_config.yaml").write_text("warmup_steps: 4000\n")
    assert _training_recipe(tmp_path, results)["settings"] == {"warmup_steps": 4000}


def test_damaged_card_inputs_are_named(model_dir, tmp_path):
    """eval_results.json that is no object, a recipe that is no YAML and a template that is no UTF-8 text: each named
    (an AttributeError, a bare yaml ReaderError and a codec error before)."""
    import shutil

    from modeling_seq2seq.hub import build_hub_folder

    for name, content, message in [("eval_results.json", b"[1, 2]", "expected a JSON object, got list"),
                                   ("training_config.yaml", b"a: [\n", "not readable as YAML"),
                                   ("template.md", b"\xca\xfe card", "the model card template is not UTF-8 text")]:
        folder = tmp_path / name
        shutil.copytree(model_dir, folder)
        (folder / name).write_bytes(content)
        template = folder / name if name == "template.md" else TEMPLATE
        with pytest.raises(ValueError, match=re.escape(f"{folder / name}")) as raised:
            build_hub_folder(folder, tmp_path / "out", template=template)
        assert message in str(raised.value)
        assert not (tmp_path / "out").exists()


def test_weights_written_otherwise_than_the_model_holds_are_not_published(model_dir, tmp_path, monkeypatch):
    """The folder's safetensors file is read back and compared with the model: a weight written wrong (a faulty
    save, a dtype rounding) stops the build, naming it."""
    import transformers.modeling_utils
    from modeling_seq2seq.hub import build_hub_folder

    save = transformers.modeling_utils.safe_save_file

    def save_one_weight_wrong(tensors, *args, **kwargs):
        name = "model.encoder.layers.0.feed_forward.fc1.weight"
        return save({**tensors, name: tensors[name] + 1e-3}, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_one_weight_wrong)
    with pytest.raises(RuntimeError, match=r"saved model\.encoder\.layers\.0\.feed_forward\.fc1\.weight differs"):
        build_hub_folder(model_dir, tmp_path / "out", template=TEMPLATE)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("version, refused", [("3.5.1", True), ("4.56.2", True), ("4.57.0", False), ("4.57.6", False),
                                              ("5.0.0", True), ("5.3.0", True), ("5.0.0rc1", True), ("5.4.0", False),
                                              ("5.15.1", False), ("5.24.0", False), ("6.0.0.dev0", False)])
def test_the_shipped_config_refuses_the_transformers_releases_that_run_the_model_wrongly(version, refused):
    """The Hub's copy of configuration_seq2seq.py runs under whatever transformers a user has, past the package's
    version floor: before 4.57 the shipped decoding file does not import, 5.0 to 5.3 give other tokens with a static
    cache and (5.3) leave a loaded model's output projection on the meta device (seen in venvs of each release,
    sixteenth session). A config made under one of them is refused, by name."""
    from modeling_seq2seq.configuration_seq2seq import refuse_broken_transformers

    if refused:
        with pytest.raises(ImportError, match=rf"transformers {re.escape(version)} is installed"):
            refuse_broken_transformers(version)
    else:
        refuse_broken_transformers(version)
