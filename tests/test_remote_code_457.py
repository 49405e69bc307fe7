"""The shared folder on the last transformers 4.x (issue 4): loads with trust_remote_code=True, generates the same.

A virtual environment with `transformers==4.57.*` is made once and cached (default
`~/.cache/modeling_seq2seq/venv-tf457`, or `$MODELING_SEQ2SEQ_VENV_457`). It is created with
`--system-site-packages`, so it uses this interpreter's torch; pip installs transformers 4.57 there together with what
4.57 pins (huggingface_hub<1.0, tokenizers<0.23), shadowing the 5.x versions. When pip cannot reach a package index
the test is skipped, saying so.

In that environment, with `import modeling_seq2seq` blocked, the probe of `test_hub.py` loads the folder built by
5.x, generates (greedy and beam search), runs our `seq2seq-translation` pipeline and the stock 4.57 `translation`
pipeline; everything must equal what our package produces on 5.x.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("hub_test_helpers", Path(__file__).with_name("test_hub.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

pytestmark = pytest.mark.slow

VENV = Path(os.environ.get("MODELING_SEQ2SEQ_VENV_457", Path.home() / ".cache" / "modeling_seq2seq" / "venv-tf457"))
REQUIREMENT = "transformers==4.57.*"
UNREACHABLE = (
    "NewConnectionError",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Name or service not known",
    "ConnectTimeoutError",
    "Max retries exceeded",
    "No matching distribution found for transformers",
    "Could not fetch URL",
    "ProxyError",
)


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _versions(python: Path) -> dict | None:
    code = (
        "import json, torch, transformers, tokenizers, huggingface_hub;"
        "print(json.dumps({'transformers': transformers.__version__, 'torch': torch.__version__,"
        " 'tokenizers': tokenizers.__version__, 'huggingface_hub': huggingface_hub.__version__}))"
    )
    proc = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return None
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])


def _see_our_packages(venv: Path) -> None:
    """When the tests run in a virtual environment, `--system-site-packages` exposes the base interpreter's packages,
    not this environment's torch: list this environment's site-packages in a .pth file of the new one. They come
    after the new environment's own packages (so transformers 4.57 wins), and pip never uninstalls outside the new
    environment."""
    if sys.prefix == sys.base_prefix:
        return
    import site

    code = "import site, sys; print(site.getsitepackages()[0])"
    target = subprocess.run([str(_venv_python(venv)), "-c", code], capture_output=True, text=True, check=True)
    paths = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(target.stdout.strip()) / "_modeling_seq2seq_parent_env.pth").write_text("".join(p + "\n" for p in paths))


def ensure_venv(venv: Path = VENV) -> tuple[Path, dict]:
    """Create (once) the 4.57 environment; return its python and its package versions. Skips when offline."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    marker = venv / ".modeling_seq2seq-complete"
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one creator at a time (parallel test runs)
        if marker.is_file():
            versions = _versions(_venv_python(venv))
            if versions and versions["transformers"].startswith("4.57.") and versions["torch"] == torch.__version__:
                return _venv_python(venv), versions
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, capture_output=True,
            timeout=300,
        )
        _see_our_packages(venv)
        proc = subprocess.run(
            [str(_venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", REQUIREMENT],
            capture_output=True, text=True, timeout=900,
        )
        if proc.returncode != 0:
            output = proc.stdout + proc.stderr
            shutil.rmtree(venv, ignore_errors=True)
            if any(sign in output for sign in UNREACHABLE):
                last_line = output.strip().splitlines()[-1]
                pytest.skip(f"cannot install {REQUIREMENT}: no package index reachable ({last_line})")
            raise AssertionError(f"pip install {REQUIREMENT} failed:\n{output[-4000:]}")
        versions = _versions(_venv_python(venv))
        assert versions is not None, "the 4.57 environment does not import torch/transformers"
        marker.write_text(repr(versions))
        return _venv_python(venv), versions


@pytest.fixture(scope="module")
def venv_457():
    return ensure_venv()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The model dir, the Hub folder built by 5.x, and the package's 5.x outputs on it."""
    from modeling_seq2seq.hub import build_hub_folder

    model_dir = helpers.shared_model_dir(tmp_path_factory)
    folder = tmp_path_factory.mktemp("hub") / "repo"
    build_hub_folder(model_dir, folder, repo_id="someone/tiny-transformer", template=helpers.TEMPLATE)
    model, tokenizer = helpers.load_original(model_dir)
    reference = helpers.reference_outputs(model, tokenizer)
    reference["decoded"] = tokenizer.batch_decode(reference["greedy"], skip_special_tokens=True)
    return folder, reference


def test_environment_is_transformers_457_with_our_torch(venv_457):
    _, versions = venv_457
    assert versions["transformers"].startswith("4.57.")
    assert versions["torch"] == torch.__version__
    assert int(versions["huggingface_hub"].split(".")[0]) < 1
    assert tuple(int(x) for x in versions["tokenizers"].split(".")[:2]) < (0, 23)


def test_folder_loads_and_generates_identically_on_457(venv_457, shared, tmp_path):
    python, _ = venv_457
    folder, reference = shared
    probe = helpers.run_probe(str(python), folder, tmp_path)
    assert probe["transformers_version"].startswith("4.57.")
    assert probe["package_importable"] is False
    assert probe["task_is_stock"] is False  # no stock 4.57 task is called "seq2seq-translation"
    assert probe["model_module"].startswith("transformers_modules.")
    assert probe["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert probe["lm_head_tied"] is True
    # 4.57's PretrainedConfig sets the token ids it is not handed to None: the config passes each on.
    saved = json.loads((folder / "config.json").read_text())
    assert probe["token_ids"] == {key: saved[key] for key in probe["token_ids"]}
    assert probe["import_events"] == []
    helpers.assert_matches_reference(probe, reference)
    assert probe["decode_step_scripted"] is True
    assert probe["decoded"] == reference["decoded"]

    # Our pipeline, loaded from the folder's pipeline.py by 4.57.
    assert probe["pipeline_module"].startswith("transformers_modules.")
    assert [r["translation_text"] for r in probe["pipeline"]] == reference["decoded"]

    # The stock 4.57 translation pipeline on the same folder.
    assert probe["stock_pipeline_class"] == "TranslationPipeline"
    assert [r["translation_text"] for r in probe["stock_translation"]] == reference["decoded"]
