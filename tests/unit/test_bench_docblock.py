"""A benchmark's table between its markers in a doc: replaced in place, appended the first time."""

from bench.docblock import write_block


def test_the_block_is_appended_once_then_replaced_in_place(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nbefore\n")
    write_block(str(doc), "soak", "first table", "Soak")
    doc.write_text(doc.read_text() + "\nafter\n")
    write_block(str(doc), "soak", "second table", "Soak")
    assert doc.read_text() == (
        "# Title\n\nbefore\n\n## Soak\n\n<!-- soak:begin -->\nsecond table\n<!-- soak:end -->\n\nafter\n"
    )
    assert not (tmp_path / "doc.md.tmp").exists()
