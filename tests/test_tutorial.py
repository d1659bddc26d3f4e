"""The docs are kept true by CI: every command that README.md, TUTORIAL.md and the pages in docs/
show (in code blocks and inline) names files and options that exist; every run folder they name is
one that a command makes (a script's default --out, or an --out given in the same page); every
local link and figure exists; the python snippets run, README's snippet that reuses a trained model
verbatim on a real (tiny) run; TUTORIAL's 30-line quantizer gives what VectorQuantizer gives; and
the scripts in docs/ that draw the figures run."""
import ast
import json
import os
import re
import shlex
import subprocess
import sys
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "TUTORIAL.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))
TRAIN_SCRIPTS = sorted(p.name for p in ROOT.glob("train_*.py"))


def text(doc: str) -> str:
    return (ROOT / doc).read_text()


def blocks(doc: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text(doc), re.S)


def command_lines(doc: str) -> list[str]:
    """The shell commands of a page: the lines of its bash blocks (continued lines joined, each
    `&&` part apart) and its inline code spans that start with python or torchrun."""
    lines = [line for block in blocks(doc, "bash") for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", text(doc), flags=re.S)
    lines += re.findall(r"`((?:[A-Z_]+=\S+ )*(?:python|torchrun) [^`]+)`", prose)
    return [part for line in lines for part in line.split("&&")]


def commands(doc: str) -> list[list[str]]:
    out = []
    for part in command_lines(doc):
        words = shlex.split(part.split(" #")[0])
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
            words = words[1:]
        if words:
            out.append(words)
    return out


@lru_cache
def help_text(script: str) -> str:
    return subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                          cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout


@lru_cache
def default_outs() -> set[str]:
    """runs/<name>_<preset> for every preset of every training script, read from its --help."""
    outs = set()
    for script in TRAIN_SCRIPTS:
        usage = help_text(script)
        name = re.search(r"default runs/(\w+)_<preset>", usage).group(1)
        presets = re.search(r"--preset \{([\w,]+)\}", usage).group(1).split(",")
        outs |= {f"runs/{name}_{preset}" for preset in presets}
    return outs


@pytest.mark.parametrize("doc", DOCS)
def test_scripts_and_options_in_commands_exist(doc):
    for words in commands(doc):
        if words[0] not in ("python", "torchrun", "bash") or "-c" in words or "-m" in words:
            continue
        scripts = [w for w in words if w.endswith((".py", "/run"))]
        assert scripts, f"{doc}: {' '.join(words)}: names no script"
        script = scripts[0]
        assert (ROOT / script).exists(), f"{doc}: {' '.join(words)}: {script} does not exist"
        if script.endswith(".py"):  # options before it belong to python or torchrun
            for option in (w.split("=")[0] for w in words[words.index(script) + 1:] if w.startswith("--")):
                assert option in help_text(script), f"{doc}: {' '.join(words)}: {script} has no option {option}"


def test_readme_keeps_the_fresh_machine_commands():
    """.ci/run installs and tests as README says; a user runs the main job with one line."""
    readme = text("README.md")
    assert ("pip install torch numpy matplotlib pytest pybind11 ninja vizdoom==1.3.2 soundfile && pip install "
            "--no-build-isolation -e . && python -m pytest tests -q") in readme
    assert "pip install torch numpy matplotlib && python train_cifar.py" in readme
    quick_start = readme[readme.index("## Quick start"):readme.index("pip install torch numpy matplotlib &&")]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu " in quick_start, \
        "README: the CPU-only install of torch comes before the first command"


@pytest.mark.parametrize("doc", DOCS)
def test_run_folders_named_are_made_by_a_command(doc):
    """A run folder the page names is a script's default --out, or the --out of a command in the page."""
    made = {words[words.index("--out") + 1].rstrip("/") for words in commands(doc)
            if "--out" in words and any(w in TRAIN_SCRIPTS for w in words)}
    for folder in re.findall(r"\bruns/[\w.-]+", text(doc)):
        assert folder in default_outs() | made, f"{doc}: {folder} is neither a default --out ({sorted(default_outs())}) " \
                                                f"nor made by a command of the page"


@pytest.mark.parametrize("doc", DOCS)
def test_local_links_and_figures_exist(doc):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text(doc)):
        if not re.match(r"[a-z]+://", target):
            assert ((ROOT / doc).parent / target).exists(), f"{doc}: link to {target}, which does not exist"


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(doc: str) -> list[str]:
    return re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text(doc), flags=re.S), re.M)


@pytest.mark.parametrize("doc", DOCS)
def test_cross_references_name_sections_that_exist(doc):
    """Links with an #anchor, `page.md`, "Heading" and README, "Heading" references, and
    "section N" (of TUTORIAL.md) land on a heading that exists."""
    here = (ROOT / doc).parent
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text(doc)):
        page = str(((here / target) if target else ROOT / doc).resolve().relative_to(ROOT))
        assert anchor in map(slug, headings(page)), f"{doc}: #{anchor} is no heading of {page}"
    for page, heading in re.findall(r"`?(README|[\w/.-]+\.md)`?,\s+\"([^\"]+)\"", text(doc)):
        page = "README.md" if page == "README" else page
        page = page if (ROOT / page).exists() else str(((here / page).resolve()).relative_to(ROOT))
        assert heading in headings(page), f"{doc}: {page} has no section \"{heading}\""
    numbered = {int(n) for n in re.findall(r"^## (\d+)\.", text("TUTORIAL.md"), re.M)}
    for n in re.findall(r"\bsections? (\d+)", text(doc)):
        assert int(n) in numbered, f"{doc}: section {n}, but TUTORIAL.md has sections {sorted(numbered)}"


def metrics_keys() -> set[str]:
    """Every key, at any depth, of the metrics.json files of the runs behind the results pages."""
    keys = set()

    def walk(value):
        if isinstance(value, dict):
            keys.update(value)
            for v in value.values():
                walk(v)
    for path in (ROOT / "docs/results/runs").glob("*/metrics.json"):
        walk(json.loads(path.read_text()))
    return keys


@pytest.mark.parametrize("doc", DOCS)
def test_metrics_json_keys_quoted_are_written(doc):
    """In a paragraph that speaks of metrics.json, each `snake_case` name (or `glob_*`) is a key
    that the runs wrote."""
    keys = metrics_keys()
    for paragraph in re.split(r"\n\s*\n", text(doc)):
        if "metrics.json" not in paragraph:
            continue
        for name in re.findall(r"`([a-z][a-z0-9_*]*)`", paragraph):
            assert any(fnmatch(key, name) for key in keys), f"{doc}: `{name}` is no key of metrics.json"


@pytest.mark.parametrize("doc", DOCS)
def test_option_errors_quoted_are_what_the_scripts_say(doc):
    """A quoted refusal of an option ("argument --steps: ...; got 0") is the message that the
    option gives, word for word."""
    for quote in re.findall(r"\"(argument --[^\"]+)\"", " ".join(text(doc).split())):
        option, value = re.match(r"argument (--[\w-]+):.*got (\S+)$", quote).groups()
        run = subprocess.run([sys.executable, str(ROOT / "train_cifar.py"), option, value], capture_output=True,
                             text=True, cwd=ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 2 and quote in " ".join(run.stderr.split()), (doc, quote, run.stderr)


def usage_lines(script: Path) -> list[list[str]]:
    """The commands in a script's docstring (lines that start with python), options in [...] unwrapped."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    lines = [line.split(" #")[0].replace("[", " ").replace("]", " ").replace("|", " ")
             for line in doc.replace("\\\n", " ").splitlines() if line.strip().startswith("python ")]
    return [shlex.split(line) for line in lines]


HELPERS = sorted(p.relative_to(ROOT) for d in ("docs", "benchmarks") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("script", HELPERS, ids=str)
def test_usage_lines_of_the_scripts_in_docs_and_benchmarks(script):
    """Each command of a helper script's docstring names a script that exists, options that its
    --help lists, and a run folder that a training script makes by default."""
    for words in usage_lines(ROOT / script):
        named = next(w for w in words if w.endswith(".py"))
        assert (ROOT / named).exists(), f"{script}: {named} does not exist"
        for option in (w.split("=")[0] for w in words if w.startswith("--")):
            assert option in help_text(named), f"{script}: {named} has no option {option}"
        for folder in (w for w in words if w.startswith("runs/")):
            assert folder.rstrip("/") in default_outs(), f"{script}: {folder} is not a default --out"


def test_figures_drawn_by_the_scripts_in_docs_are_small():
    drawn = ["intuition", "batch_perplexity", "dead_code_norm", "collapse_ablation", "model",
             "codebook_atlas", "pixelcnn_masks", "random_codes", "code_map"]
    for figure in (ROOT / "docs" / f"{name}.png" for name in drawn):
        assert figure.stat().st_size < 200_000, f"{figure}: {figure.stat().st_size} bytes"


SNIPPETS = [(doc, b) for doc in DOCS for b in blocks(doc, "python") if "import" in b and "load_run(" not in b]


@pytest.mark.parametrize("doc,snippet", SNIPPETS, ids=lambda s: s.splitlines()[0][:40])
def test_python_snippets_run(doc, snippet):
    subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, check=True, timeout=120)


def test_readme_reuse_snippet_and_codebook_atlas_run_on_a_trained_run(tmp_path, data_dir):
    (snippet,) = [b for b in blocks("README.md", "python") if "load_run(" in b]
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
    atlas = subprocess.run([sys.executable, str(ROOT / "docs" / "draw_codebook_atlas.py"), "--run", "runs/cifar_quick",
                            "--out", "atlas.png", "--codes", "20"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert atlas.returncode == 0, atlas.stderr
    assert (tmp_path / "atlas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for script in ("draw_random_codes.py", "draw_code_map.py"):   # the tutorial's figures of a trained run
        drawn = subprocess.run([sys.executable, str(ROOT / "docs" / script), "--run", "runs/cifar_quick", "--out",
                                "figure.png"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert drawn.returncode == 0, drawn.stderr
        assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_minimal_quantizer_gives_what_vector_quantizer_gives():
    """TUTORIAL's 30-line quantizer: the same codes, z_q, losses and gradients as VectorQuantizer
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
    z_q, codes, codebook_loss, commitment_loss = minimal["quantize"](z_e2, codebook, beta=0.25)
    assert torch.equal(codes, out.codes) and len(codes.unique()) > 4
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
        _, codes, _, _ = minimal["quantize"](z_e, codebook)
        assert torch.equal(codes, out.codes)
        minimal["ema_update"](codebook, cluster_size, embed_sum, z_e, codes)
        torch.testing.assert_close(codebook, vq.codebook)
    assert (codebook - start).abs().max() > 0.1  # the codes moved: the comparison was not of two still codebooks


# The figure scripts of docs/ that need no trained run, with options that keep them short.
FIGURE_SCRIPTS = {
    "draw_intuition.py": ["--steps", "3"],
    "draw_batch_perplexity.py": ["--trials", "3"],
    "draw_dead_code_norm.py": ["--steps", "3"],
    "draw_collapse_ablation.py": [],
    "draw_model.py": [],
    "draw_pixelcnn_masks.py": [],
}


@pytest.mark.parametrize("script", FIGURE_SCRIPTS)
def test_figure_script_draws_a_png(script, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "docs" / script), "--out", str(tmp_path / "fig.png"),
                    *FIGURE_SCRIPTS[script]], check=True, timeout=120, capture_output=True)
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_figure_of_the_docs_has_its_script_tested_or_comes_from_a_run():
    """docs/draw_*.py: each one is run above (those of a trained run in the README reuse test)."""
    drawn = {p.name for p in (ROOT / "docs").glob("draw_*.py")}
    of_a_run = {"draw_codebook_atlas.py", "draw_random_codes.py", "draw_code_map.py"}
    assert drawn <= set(FIGURE_SCRIPTS) | of_a_run, drawn - set(FIGURE_SCRIPTS) - of_a_run
