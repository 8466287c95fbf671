"""`memfree bench serve`: the summary of a load run, and a short run against a tiny model in its own process."""
import json

from click.testing import CliRunner

from memfree.cli import cli
from memfree_bench.serve import summarise


def test_the_summary_counts_lost_requests_and_tells_queue_503s_from_other_5xx():
    records = [{"endpoint": "check", "status": 200, "seconds": s, "type": None} for s in (0.1, 0.2, 0.3, 0.4)]
    records += [{"endpoint": "generate", "status": 503, "seconds": 0.01, "type": "server_busy"},
                {"endpoint": "generate", "status": 400, "seconds": 0.01, "type": "invalid_request_error"}]
    res = summarise(records, sent=7, seconds=2.0)
    assert (res["sent"], res["answered"], res["lost"], res["served"]) == (7, 6, 1, 4)
    assert res["endpoints"]["check"]["p50_s"] == 0.25 and res["endpoints"]["generate"]["p50_s"] is None
    assert res["errors_by_status"] == {"400": 1, "503": 1}
    assert res["queue_503"] == 1 and res["any_5xx_besides_queue_503"] is False
    records.append({"endpoint": "check", "status": 500, "seconds": 0.1, "type": "server_error"})
    assert summarise(records, 8, 2.0)["any_5xx_besides_queue_503"] is True


def test_a_short_load_run_on_a_tiny_model(tiny_sd_path, tmp_path):
    out = tmp_path / "serve.json"
    r = CliRunner().invoke(cli, ["bench", "serve", "--model", str(tiny_sd_path), "--clients", "4", "--seconds", "3",
                                 "--steps", "1", "--mitigation", "none", "--queue-size", "1", "--json", str(out),
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["served"] > 0 and res["lost"] == 0 and res["any_5xx_besides_queue_503"] is False
    assert set(res["endpoints"]) <= {"check", "generate"} and res["rss_mb"]["start"] > 0
    assert res["settings"]["clients"] == 4
