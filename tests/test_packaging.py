"""One import name, gpt2serve, over the repository's folders: nothing here shadows a package the dependencies bring.

Hugging Face's ``kernels`` (which transformers imports) once lost to our ``kernels/`` folder whenever Python started
in the repository root; these tests keep every top-level name free and check a non-editable install from outside.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Names Python would find at the root: each folder, and each module file (the test suite's own package aside).
TOP_LEVEL = sorted({p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} |
                   {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"})


# What lives in a checkout besides the repository's files: environments, generated models, build output.
SKIP = {".git", ".venv", "models", "build", ".gpubundle", ".pytest_cache", ".hypothesis"}


def _sources() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if not SKIP.intersection(p.relative_to(ROOT).parts)
            and p != Path(__file__)]  # this file's child process imports Hugging Face's kernels, by that name


def test_no_top_level_folder_is_a_regular_package():
    # A folder with an __init__.py wins over an installed package of its name whenever the root is on sys.path;
    # a folder without one is a namespace portion, which any installed package wins over.
    assert [p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()] == []
    assert "kernels" in TOP_LEVEL and "engine" in TOP_LEVEL and "serve_app" in TOP_LEVEL


def test_the_code_imports_the_repository_only_as_gpt2serve():
    bare = re.compile(rf"^\s*(?:from|import)\s+({'|'.join(n for n in TOP_LEVEL if n != 'tests')})\b", re.M)
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in _sources()
                 for m in bare.finditer(p.read_text(encoding="utf-8"))]
    assert offenders == []


def _lock(variant: str) -> tuple[dict[str, str], list[str]]:
    """A lock's pins and its entries (each ``name==version`` line with its hash lines)."""
    text = (ROOT / "requirements" / f"{variant}.txt").read_text()
    entries = re.findall(r"^[A-Za-z0-9][^\n]*==[^\n]*(?:\n    --hash[^\n]*)*", text, re.M)
    pins = {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", text, re.M)}
    return pins, entries


def test_the_locks_pin_every_dependency_with_hashes():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {canonicalize_name(Requirement(d).name)
              for d in project["dependencies"] + project["optional-dependencies"]["test"]}
    for variant in ("cpu", "cuda"):
        pins, entries = _lock(variant)
        assert wanted - set(pins) == set(), f"requirements/{variant}.txt: run scripts/lock.sh"
        assert len(entries) == len(pins) and all("--hash=sha256:" in e for e in entries)
    assert _lock("cpu")[0]["torch"].endswith("+cpu") and "+" not in _lock("cuda")[0]["torch"]


def test_the_environment_is_the_lock_it_was_made_from():
    """A venv made by scripts/bootstrap.sh holds exactly its lock's versions (nothing upgraded behind it)."""
    stamp = Path(sys.prefix) / ".lock-stamp"
    if not stamp.exists():
        pytest.skip("not a venv made by scripts/bootstrap.sh (a fresh resolve, a GPU host, your own)")
    variant, python = stamp.read_text().split()[:2]
    assert python == "%d.%d" % sys.version_info[:2]
    if variant == "ranges":
        pytest.skip("scripts/bootstrap.sh installed from pyproject.toml's ranges: no lock for this Python")
    pins, _ = _lock(variant)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    assert {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n) != v} == {}


def test_transformers_and_peft_import_from_the_repository_root():
    """The failure users saw: with the root first on sys.path, transformers imported our kernels/ folder."""
    code = ("import importlib.util, json, sys; from transformers import GPT2LMHeadModel; import peft, gpt2serve; "
            "spec = importlib.util.find_spec('kernels'); "
            "print(json.dumps({'path0': sys.path[0], 'kernels': spec and spec.origin, "
            "'gpt2serve': gpt2serve.__file__}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["path0"] == ""  # -c puts the working directory, the root, first
    assert Path(found["gpt2serve"]).resolve() == ROOT / "__init__.py"  # resolved: a GPU host links it
    try:
        metadata.distribution("kernels")  # Hugging Face's, brought in by transformers >= 5.25
    except metadata.PackageNotFoundError:
        assert found["kernels"] is None  # our folder is no module of its own
    else:
        assert found["kernels"] and not found["kernels"].startswith(str(ROOT) + os.sep + "kernels")


CHILD = r"""
import json, os, sys
import torch
import kernels, peft
from transformers import GPT2LMHeadModel
from peft import LoraConfig, get_peft_model
import gpt2serve
from gpt2serve import LLM, SamplingParams
from gpt2serve.engine.tiny_model import build_tiny_checkpoint

model_dir = build_tiny_checkpoint(os.path.join(os.getcwd(), "tiny"))
prompt = list(range(3, 40, 3))
hf = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
ids = torch.tensor([prompt])
with torch.no_grad():
    hf_ids = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    # peft on top (its LoRA starts as the identity): transformers' and peft's kernel hooks on the import path
    wrapped = get_peft_model(hf, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    peft_ids = wrapped.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
llm = LLM(model=str(model_dir), device="cpu", dtype="float32", num_gpu_blocks=64, max_num_seqs=2)
out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=12, temperature=0,
                                                                              ignore_eos=True))
print(json.dumps({"sys_path": sys.path, "cwd": os.getcwd(), "gpt2serve": gpt2serve.__file__,
                  "kernels": kernels.__file__, "cuda_properties": hasattr(kernels, "CUDAProperties"),
                  "hf": hf_ids, "peft": peft_ids, "ours": list(out[0].outputs[0].token_ids)}))
"""


@pytest.mark.slow
def test_non_editable_install_beside_hugging_face_kernels(tmp_path):
    """`pip install .` (a wheel, not editable) into a fresh venv; from a directory outside the repository, one
    process imports transformers, peft (with Hugging Face's kernels on the path) and the engine, and greedy output
    is HF's token for token. The venv sees the test environment's site-packages for the dependencies (a .pth file,
    whose own .pth files stay unprocessed, so the editable install there is not active)."""
    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed here (transformers < 5.25)")
    source = tmp_path / "source"  # a copy, so that the build writes nothing into the checkout
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [
        n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (Path(folder) == ROOT and n in SKIP)])
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("gpt2_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"gpt2serve", wheel.name.split("-py3")[0] + ".dist-info"}
    for needed in ("gpt2serve/__init__.py", "gpt2serve/serve_app.py", "gpt2serve/kernels/paged_attention.py",
                   "gpt2serve/engine/llm_engine.py", "gpt2serve/actors/playground/index.html",
                   "gpt2serve/dashboards/json/latency.json"):
        assert needed in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    child = subprocess.run([str(python), "-c", CHILD], cwd=work, env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["gpt2serve"] == str(site / "gpt2serve" / "__init__.py")
    assert not any(p and Path(p).resolve() == ROOT for p in got["sys_path"])
    assert got["kernels"].startswith(sysconfig.get_paths()["purelib"]) and got["cuda_properties"]
    assert got["ours"] == got["hf"] == got["peft"] and len(got["ours"]) == 12
