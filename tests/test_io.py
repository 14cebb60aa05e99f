"""seqvision.io: the markdown section writer the benchmarks use for docs/benchmarks.md."""

from __future__ import annotations

from seqvision.io import replace_markdown_section


def test_replace_markdown_section_replaces_only_its_own_section_or_appends(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n## A\n\nold a\n\n## B\n\nb stays\n")
    replace_markdown_section(path, "## A", "## A\n\nnew a\n")
    assert path.read_text() == "# Benchmarks\n\n## A\n\nnew a\n\n## B\n\nb stays\n"
    replace_markdown_section(path, "## C", "## C\n\nc\n")
    assert path.read_text().endswith("## B\n\nb stays\n\n## C\n\nc\n")
    replace_markdown_section(tmp_path / "new.md", "## A", "## A\n\na\n")
    assert (tmp_path / "new.md").read_text().startswith("# Benchmarks\n") and "## A\n\na\n" in (tmp_path / "new.md").read_text()
