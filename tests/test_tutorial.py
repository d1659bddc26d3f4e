"""Every command TUTORIAL.md and README.md show refers to files and options that exist: a broken
tutorial fails CI. Python snippets in TUTORIAL.md run, and its 30-line quantizer gives what
VectorQuantizer gives; README's snippet that reuses a trained model runs verbatim on a real (tiny)
run; the script that draws the intuition figure runs."""
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["TUTORIAL.md", "README.md"]


def blocks(doc: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / doc).read_text(), re.S)


def commands(doc: str) -> list[list[str]]:
    out = []
    for block in blocks(doc, "bash"):
        for line in block.replace("\\\n", " ").splitlines():  # join continued lines
            for part in line.split("&&"):
                words = shlex.split(part.split("#")[0])
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                    words = words[1:]
                if words:
                    out.append(words)
    return out


@lru_cache
def help_text(script: str) -> str:
    return subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                          cwd=ROOT, check=True).stdout


@pytest.mark.parametrize("doc", DOCS)
def test_scripts_and_options_in_commands_exist(doc):
    checked = 0
    for words in commands(doc):
        scripts = [w for w in words if w.endswith((".py", "/run"))]
        for script in scripts:
            if words[0] in ("python", "torchrun", "bash"):
                assert (ROOT / script).exists(), f"{doc}: {' '.join(words)}: {script} does not exist"
                checked += 1
        if scripts and scripts[0].startswith("train_"):
            script_args = words[words.index(scripts[0]) + 1:]  # options before it belong to python/torchrun
            for option in (w.split("=")[0] for w in script_args if w.startswith("--")):
                assert option in help_text(scripts[0]), f"{doc}: {' '.join(words)}: no option {option}"
    assert checked > 0


@pytest.mark.parametrize("snippet", blocks("TUTORIAL.md", "python"), ids=lambda s: s.splitlines()[0][:40])
def test_python_snippets_run(snippet):
    if "import" not in snippet:
        pytest.skip("a fragment, not a program")
    subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, check=True, timeout=120)


def test_readme_reuse_snippet_runs_on_a_trained_run(tmp_path, data_dir):
    (snippet,) = [b for b in blocks("README.md", "python") if "training.load_run" in b]
    from conftest import CIFAR
    subprocess.run([sys.executable, str(ROOT / "train_cifar.py"), "--data", str(CIFAR), "--data-dir", str(data_dir),
                    "--out", "runs/cifar_quick", "--steps", "2", "--prior-steps", "2", "--prior-channels", "8",
                    "--prior-num-layers", "2", "--hidden-channels", "16", "--res-channels", "8", "--max-train-images", "64",
                    "--max-test-images", "20", "--stages", "vqvae,prior"], cwd=tmp_path, check=True, timeout=300,
                   capture_output=True)
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert "torch.Size([2, 3, 32, 32])" in run.stdout


def test_minimal_quantizer_gives_what_vector_quantizer_gives():
    """TUTORIAL's 30-line quantizer: the same indices, z_q, losses and gradients as VectorQuantizer
    with the codebook loss, and the same codebooks over EMA steps (Appendix A.1)."""
    import torch
    import vqvae
    (snippet,) = [b for b in blocks("TUTORIAL.md", "python") if "def quantize(" in b]
    minimal = {}
    exec(snippet, minimal)
    torch.manual_seed(0)
    vq = vqvae.VectorQuantizer(16, 4, commitment_cost=0.25)
    z_e = torch.randn(3, 4, 5, 6, requires_grad=True)
    out = vq(z_e)
    z_e2, codebook = z_e.detach().clone().requires_grad_(), vq.codebook.detach().clone().requires_grad_()
    z_q, indices, codebook_loss, commitment_loss = minimal["quantize"](z_e2, codebook, beta=0.25)
    assert torch.equal(indices, out.indices) and len(indices.unique()) > 4
    torch.testing.assert_close(z_q, out.z_q)
    torch.testing.assert_close(codebook_loss, out.codebook_loss)
    torch.testing.assert_close(commitment_loss, out.commitment_loss)
    (out.z_q.square().sum() + out.codebook_loss + out.commitment_loss).backward()
    (z_q.square().sum() + codebook_loss + commitment_loss).backward()
    torch.testing.assert_close(z_e2.grad, z_e.grad)
    torch.testing.assert_close(codebook.grad, vq.codebook.grad)

    vq = vqvae.VectorQuantizer(16, 4, decay=0.99).train()
    codebook = vq.codebook.clone()
    start, cluster_size, embed_sum = codebook.clone(), torch.ones(16), codebook.clone()
    for _ in range(5):
        z_e = torch.randn(3, 4, 5, 6) + 0.5
        out = vq(z_e)
        _, indices, _, _ = minimal["quantize"](z_e, codebook)
        assert torch.equal(indices, out.indices)
        minimal["ema_update"](codebook, cluster_size, embed_sum, z_e, indices)
        torch.testing.assert_close(codebook, vq.codebook)
    assert (codebook - start).abs().max() > 0.1  # the codes moved: the comparison was not of two still codebooks


def test_intuition_figure_script_draws_a_png(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "docs" / "draw_intuition.py"), "--out", str(tmp_path / "fig.png"),
                    "--steps", "3"], check=True, timeout=120, capture_output=True)
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
