"""The results pages come back from their runs: every table of docs/results/*.md is what
docs/results/tables.py writes from the metrics.json kept in docs/results/runs/, and every run
recorded exactly the options of the command that its table gives (data included)."""
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

import train_cifar
import train_vctk
import train_video
from conftest import ROOT

spec = importlib.util.spec_from_file_location("results_tables", ROOT / "docs/results/tables.py")
tables = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = tables   # dataclasses look their module up by name
spec.loader.exec_module(tables)
SCRIPTS = {"train_cifar.py": train_cifar, "train_vctk.py": train_vctk, "train_video.py": train_video}
# Options that name where a run wrote or how it was resumed, not what it computed.
WHERE = {"out", "data_dir", "resume", "resumable", "device"}


def rows():
    """(page, table, command, run) of every row whose run has a metrics.json."""
    for page, named in tables.TABLES.items():
        for name, table in named.items():
            if isinstance(table, tables.Table):
                yield from ((page, name, command, run) for _, command, run in table.rows)
            elif isinstance(table, tables.Measures):
                yield page, name, table.command, table.run


@pytest.mark.parametrize("page", tables.TABLES)
def test_each_table_is_what_its_runs_give(page):
    path = ROOT / "docs/results" / page
    assert path.read_text() == tables.rewrite(path, tables.TABLES[page]), \
        f"{page}: a table differs from its runs: python docs/results/tables.py"


@pytest.mark.parametrize("page, table, command, run", list(rows()), ids=lambda x: x if isinstance(x, str) else "")
def test_each_run_recorded_the_options_of_its_command(page, table, command, run):
    words = shlex.split(command)
    assert words[0] == "python" and words[1] in SCRIPTS, command
    args = SCRIPTS[words[1]].parse_args(words[2:] + ["--out", f"runs/{run}"])
    config = json.loads((tables.RUNS / run / "metrics.json").read_text())["config"]
    for key, value in vars(args).items():
        if key in WHERE:
            continue
        if key == "data":   # the file or folder, wherever it lies
            assert Path(config["data"]).name == Path(value).name, (run, key)
        elif key == "stages":
            assert sorted(config["stages"]) == sorted(value), (run, key)
        else:
            assert config.get(key) == value, (run, key, config.get(key), value)


@pytest.mark.parametrize("page", sorted({page for page, *_ in rows()}))
def test_each_page_names_the_data_of_its_runs(page):
    """All runs of a page read the same data, whose content key the page gives in one line."""
    keys = {json.loads((tables.RUNS / run / "metrics.json").read_text())["config"]["training_data"]
            for p, _, _, run in rows() if p == page}
    assert len(keys) == 1, (page, keys)
    assert f"`{keys.pop()}`" in (ROOT / "docs/results" / page).read_text()
