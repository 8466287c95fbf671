"""`memfree audit data --model testbed`: every planted duplication group of the bundled testbed, and nothing else."""
import json

from click.testing import CliRunner

from memfree.audit import audit_data, ground_truth_for, score_against
from memfree.cli import cli
from memfree.index import TrainingIndex
from memfree_testbed.bundle import model_dir


def test_audit_finds_every_planted_group():
    truth = ground_truth_for(model_dir())
    assert truth is not None and len(truth["items"]) == 6560
    kinds = [g["kind"] for g in truth["groups"]]
    assert (kinds.count("verbatim"), kinds.count("image_dup"), kinds.count("caption_dup")) == (20, 10, 10)
    report = audit_data(TrainingIndex.load(model_dir() / "index"), truth["items"])
    score = score_against(report, truth["groups"])
    assert score["precision"] == 1.0 and score["recall"] == 1.0, score
    assert report["summary"]["by_kind"] == {"verbatim": 20, "image_dup": 10, "caption_dup": 10}


def test_cli_scores_the_testbed(tmp_path):
    res = CliRunner().invoke(cli, ["audit", "data", "--model", "testbed", "--json", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["precision"] == 1.0 and report["recall"] == 1.0
    assert len(report["clusters"]) == 40
