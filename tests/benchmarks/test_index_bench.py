"""`memfree bench index` on a small synthetic set: rows per nprobe with recall against exact search."""
import json

from click.testing import CliRunner

from memfree.cli import cli


def test_index_bench_small(tmp_path):
    out = tmp_path / "bench-index.json"
    r = CliRunner().invoke(cli, ["bench", "index", "--vectors", "4000", "--dim", "32", "--nprobe", "4,16",
                                 "--queries", "20", "--memory-budget", "300KB", "--embed-images", "20",
                                 "--work", str(tmp_path / "work"), "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert [row["nprobe"] for row in res["rows"]] == [4, 16]
    for row in res["rows"]:
        assert row["vectors"] == 4000 and row["dim"] == 32 and row["factory"].startswith("IVF")
        assert 0.5 <= row["recall_at_10"] <= 1.0 and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["peak_memory_mb"] > 0 and row["build_vectors_per_s"] > 0
    assert res["rows"][1]["recall_at_10"] >= res["rows"][0]["recall_at_10"]
    assert res["embedding"]["images"] == 20 and res["embedding"]["images_per_s"] > 0
    assert not (tmp_path / "work" / "4000").exists()   # scratch removed
