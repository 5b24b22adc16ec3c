"""Evidence for the model card: the frozen prompt set stays what was committed, `ldm eval shapes
--json-out` writes what reproduces a result, and the card's metric table is the committed results."""
from __future__ import annotations

import json
import runpy
import tomllib
from pathlib import Path

import pytest

from ldm.cli import main
from ldm.shapes.prompt_sets import CATEGORIES, FROZEN_SET, cases_digest, eval_cases, frozen_cases
from tiny import write_tiny_sd_folder

ROOT = Path(__file__).resolve().parents[1]
FROZEN_DIGEST = "b36cbe929830"  # of the committed file's cases: a changed file is a new prompt set


@pytest.fixture(scope="module")
def tables():
    return runpy.run_path(str(ROOT / "scripts" / "model_card_tables.py"))


def test_frozen_set_is_the_committed_one():
    cases = frozen_cases()
    assert cases_digest(cases) == FROZEN_DIGEST
    assert all(len(cases[c]) == 50 for c in CATEGORIES)
    assert all(c.category == category for category in CATEGORIES for c in cases[category])
    assert all(c.init is not None for c in cases["img2img"])
    assert frozen_cases(5) == {c: cs[:5] for c, cs in cases.items()}
    with pytest.raises(ValueError, match="frozen prompt set holds 50"):
        frozen_cases(51)


def test_frozen_set_shares_no_case_with_the_sets_stages_were_selected_on():
    frozen = {(c.prompt, c.seed) for cs in frozen_cases().values() for c in cs}
    for seed in (0, 1, 2):
        seen = {(c.prompt, c.seed) for cs in eval_cases(50, seed).values() for c in cs}
        assert not frozen & seen, seed


def test_frozen_set_ships_as_package_data():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ldm"]
    assert FROZEN_SET.relative_to(ROOT / "ldm").as_posix() in package_data


def test_eval_json_out_writes_what_reproduces_the_result(tmp_path, capsys):
    model = write_tiny_sd_folder(tmp_path / "sd", "sd1")
    out = tmp_path / "new" / "folder" / "result.json"
    code = main(["eval", "shapes", "--model", str(model), "--n", "1", "--steps", "2", "--prompt-set", "frozen",
                 "--json-out", str(out), "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 0 and json.loads(stdout) == json.loads(out.read_text())
    result = json.loads(stdout)
    assert result["prompt_set"] == "frozen" and result["seed"] is None and result["n"] == 1
    assert result["cases_sha256"] == cases_digest(frozen_cases(1))
    assert result["model"] == "sd" and len(result["model_hash"]) == 10
    assert (result["sampler"], result["steps"], result["guidance"], result["karras"]) == ("dpmpp_2m", 2, 7.5, None)
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind


def test_model_card_table_is_the_committed_results(tables):
    assert tables["check"](), "run scripts/model_card_tables.py"


def test_card_check_catches_drift(tables, tmp_path):
    card = tmp_path / "card.md"
    results = tables["load_results"]()
    good = tables["updated_card"](f"intro\n{tables['BEGIN']}\nold\n{tables['END']}\nrest\n", results)
    card.write_text(good)
    assert tables["check"](card)
    card.write_text(good.replace("the honest figure", "the figure"))
    assert not tables["check"](card)
    card.write_text("a card without the markers\n")
    with pytest.raises(ValueError, match="eval-table:begin"):
        tables["check"](card)


@pytest.mark.parametrize("change, error", [({"model_hash": "0000000000"}, "model_hash"),
                                           ({"cases_sha256": "000000000000"}, "another frozen set")])
def test_a_table_holds_one_model_and_the_committed_frozen_set(tables, tmp_path, change, error):
    for path in (ROOT / "docs" / "eval").glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    frozen = json.loads((tmp_path / "default_model_frozen.json").read_text())
    (tmp_path / "default_model_frozen.json").write_text(json.dumps({**frozen, **change}))
    with pytest.raises(ValueError, match=error):
        tables["load_results"](tmp_path)
