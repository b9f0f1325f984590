"""metrics.jsonl with a torn final line (run killed mid-append): skipped with a note; torn middle lines stay errors."""

import json

import pytest

from repvit.train.plot import read_metrics


def _rows(n):
    return [dict(epoch=e, train_loss=1.0 / (e + 1), val_top1=50.0 + e, lr=1e-3) for e in range(n)]


def _write(tmp_path, text):
    (tmp_path / "metrics.jsonl").write_text(text)
    return tmp_path


def _full(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_torn_final_line_is_skipped_with_a_note(tmp_path, capsys):
    rows = _rows(3)
    torn = json.dumps(_rows(4)[3])[:17]  # no newline: the append was cut off
    assert read_metrics(_write(tmp_path, _full(rows) + torn)) == rows
    err = capsys.readouterr().err
    assert "note:" in err and "line 4" in err and "incomplete" in err


def test_torn_final_line_followed_by_blank_lines(tmp_path, capsys):
    rows = _rows(2)
    assert read_metrics(_write(tmp_path, _full(rows) + '{"epoch": 2, "tra\n\n  \n')) == rows
    assert "line 3" in capsys.readouterr().err


def test_final_line_that_parses_to_a_non_object_is_skipped(tmp_path, capsys):
    # '{"epoch": 12' torn after a digit would fail, but a bare '1' parses: it is no row either
    rows = _rows(2)
    assert read_metrics(_write(tmp_path, _full(rows) + "1")) == rows
    assert "note:" in capsys.readouterr().err


def test_malformed_middle_line_is_still_an_error(tmp_path):
    rows = _rows(3)
    text = json.dumps(rows[0]) + "\n" + '{"epoch": 1, "tr' + "\n" + json.dumps(rows[2]) + "\n"
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        read_metrics(_write(tmp_path, text))


def test_only_a_torn_line_means_no_epochs(tmp_path, capsys):
    with pytest.raises(ValueError, match="no epochs yet"):
        read_metrics(_write(tmp_path, '{"epoch": 0, "train_lo'))


def test_complete_file_has_no_note(tmp_path, capsys):
    rows = _rows(2)
    assert read_metrics(_write(tmp_path, _full(rows))) == rows
    assert capsys.readouterr().err == ""


def test_plot_command_draws_a_run_with_a_torn_last_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from repvit.cli import main
    run = _write(tmp_path, _full(_rows(2)) + '{"epoch": 2, "train_loss": 0.')
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "skipping the incomplete last line 3" in capsys.readouterr().err


def test_a_foreign_metrics_file_is_a_clear_error_and_optional_columns_may_come_late(tmp_path, capsys):
    """Another tool's metrics.jsonl used to end in a KeyError traceback; a column that appears only from some
    epoch on (an EMA switched on at a resume) is plotted where present."""
    from repvit.cli import main
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text('{"epoch": 0, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="lacks 'train_loss', 'val_top1': not a metrics.jsonl written by repvit"):
        read_metrics(foreign)
    assert main(["plot", str(foreign)]) == 2
    assert "not a metrics.jsonl" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    rows = _rows(3)
    rows[2]["ema_val_top1"] = 55.0
    run = _write(tmp_path, _full(rows))
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(run), "--out", str(tmp_path / "c.txt")]) == 2
    assert ".png" in capsys.readouterr().err and not (tmp_path / "c.txt").exists()
