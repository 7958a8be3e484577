"""Every long step shows progress (issue 23, item 15): circuit's scoring loop (it was silent
for its whole run), and the report's sections."""

from __future__ import annotations

from circuits.cli import main


def test_circuit_and_report_show_progress(tmp_path, capsys):
    assert main(["circuit", "--data", "synthetic:test:8", "--limit", "4", "--batch-size", "2", "--budget", "3",
                 "--out", str(tmp_path / "runs" / "circuit")]) == 0
    err = capsys.readouterr().err
    assert "circuit: eap edge and node scores" in err and "2/2" in err
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r.html")]) == 0
    assert f"report -> {tmp_path / 'r.html'}" in capsys.readouterr().err


def test_explain_randomisation_check_shows_progress(tmp_path, capsys):
    assert main(["explain", "--data", "synthetic:test:4", "--methods", "attention", "--sanity-images", "2",
                 "--batch-size", "4", "--out", str(tmp_path / "ex")]) == 0
    assert "randomisation check" in capsys.readouterr().err
