"""lora_edu.report: tables line numbers up; glue works without MyST-NB."""

from rich.console import Console

from lora_edu.report import glue, make_table


def test_table_formats_and_right_aligns_numbers():
    table = make_table([["q, v", 4_718_592, 0.01234567]], ["modules", "params", "ratio"])
    assert [c.justify for c in table.columns] == ["left", "right", "right"]
    console = Console(record=True, width=80)
    console.print(table)
    text = console.export_text()
    assert "4,718,592" in text and "0.01235" in text


def test_glue_returns_its_value():
    assert glue("answer", 42) == 42
