"""lora_edu.progress: a clean summary line on built pages, tqdm elsewhere."""

import pytest

from lora_edu.progress import progress, progress_mode


def test_static_mode_iterates_and_prints_one_summary_line(monkeypatch, capsys):
    monkeypatch.setenv("LORA_EDU_PROGRESS", "static")
    bar = progress(range(5), desc="train", unit="step")
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss=0.5 / (i + 1))
    out = capsys.readouterr().out
    assert seen == [0, 1, 2, 3, 4]
    assert out.count("\n") == 1
    assert out.startswith("train: 5/5 step in ")
    assert "loss=0.1" in out
    assert "\r" not in out and "\x1b" not in out  # no redraws, no escape codes


def test_off_mode_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv("LORA_EDU_PROGRESS", "off")
    assert list(progress(range(3))) == [0, 1, 2]
    assert capsys.readouterr().out == ""


def test_auto_mode_in_a_terminal_is_tqdm(monkeypatch):
    monkeypatch.delenv("LORA_EDU_PROGRESS", raising=False)
    bar = progress(range(2), desc="x")
    assert type(bar).__module__.startswith("tqdm")
    assert list(bar) == [0, 1]


def test_unknown_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LORA_EDU_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="LORA_EDU_PROGRESS must be one of"):
        progress_mode()
