"""The progress display: one status line per site when SAEs train at several sites."""

from jumpscope.train.progress import ProgressReporter


def row(l0, fvu):
    return {"l0": l0, "fvu": fvu, "dead_fraction": 0.0}


def test_every_site_gets_its_own_status_line(tmp_path):
    sites = {"a8": "layers.0.resid_post", "a16": "layers.0.resid_post", "b8": "layers.1.mlp_out"}
    with ProgressReporter(tmp_path / "log.jsonl", total=10, enabled=True, sites=sites) as reporter:
        reporter.report(2, 200, {"a8": row(8.0, 0.3), "a16": row(16.0, 0.2), "b8": row(7.5, 0.4)})
        lines = {site: line.desc for site, line in reporter.site_lines.items()}
    assert set(lines) == {"layers.0.resid_post", "layers.1.mlp_out"}
    assert "a8: L0 8.0 FVU 0.300" in lines["layers.0.resid_post"] and "a16: L0 16.0" in lines["layers.0.resid_post"]
    assert "b8: L0 7.5 FVU 0.400" in lines["layers.1.mlp_out"] and "a8" not in lines["layers.1.mlp_out"]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3


def test_one_site_keeps_the_single_bar(tmp_path):
    with ProgressReporter(None, total=10, enabled=True, sites={"a": "s", "b": "s"}) as reporter:
        assert reporter.site_lines == {}
