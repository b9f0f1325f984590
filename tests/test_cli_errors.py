"""CLI error contract: file-system errors (OSError and subclasses) give one `error:` line and a nonzero exit."""

import json

import pytest

from repvit.cli import main

pytest.importorskip("matplotlib")


def _run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [dict(epoch=e, train_loss=1.0 / (e + 1), val_top1=50.0 + e, lr=1e-3) for e in range(2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _assert_one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repvit plot: error: "), err
    for n in needles:
        assert n in lines[0], err


def test_plot_to_a_directory_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("REPVIT_DEBUG", raising=False)
    out = tmp_path / "somedir"
    out.mkdir()
    rc = main(["plot", str(_run_dir(tmp_path)), "--out", str(out)])
    _assert_one_line_error(capsys, rc, "is a directory", str(out))
    assert list(out.iterdir()) == []  # nothing written, no temp file left behind


def test_plot_under_a_file_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    # atomic_write's own OSError ("... is not a writable directory"); works even when run as root
    monkeypatch.delenv("REPVIT_DEBUG", raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = main(["plot", str(_run_dir(tmp_path)), "--out", str(blocker / "curves.png")])
    _assert_one_line_error(capsys, rc, "not a writable directory")


def test_permission_error_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    # chmod cannot make a PermissionError for root, so the handler raises it (as the OS would)
    monkeypatch.delenv("REPVIT_DEBUG", raising=False)
    import repvit.train.plot as plot

    def denied(run_dir, out=None):
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(plot, "plot_run", denied)
    rc = main(["plot", str(_run_dir(tmp_path)), "--out", str(tmp_path / "x.png")])
    _assert_one_line_error(capsys, rc, "Permission denied")


def test_repvit_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("REPVIT_DEBUG", "1")
    out = tmp_path / "somedir"
    out.mkdir()
    with pytest.raises(IsADirectoryError):
        main(["plot", str(_run_dir(tmp_path)), "--out", str(out)])
