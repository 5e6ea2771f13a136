"""docs/design.md, "Layout" names every file of the package and of the extension in the row of its folder, and
names no file that is not there. The README links to that table instead of keeping its own."""
import re

from tests.helpers import REPO_ROOT

DESIGN = (REPO_ROOT / "docs" / "design.md").read_text()
SOURCE_SUFFIXES = (".py", ".cpp", ".h", ".cu")


def layout_rows() -> dict:
    """`{folder: [the row's job cell, ...]}` for the rows whose path cell is one folder (`` `dpo_kernels/bench/` ``)."""
    section = re.search(r"^## Layout\n(.*?)^## ", DESIGN, re.MULTILINE | re.DOTALL).group(1)
    rows = {}
    for line in section.splitlines():
        match = re.fullmatch(r"\| `([\w/]+/)` \| (.*) \|", line)
        if match:
            rows.setdefault(match.group(1), []).append(match.group(2))
    return rows


def named_files(cells) -> set:
    return {name for cell in cells for name in re.findall(r"`([\w.]+)`", cell) if name.endswith(SOURCE_SUFFIXES)}


def source_folders():
    """Every folder of the package and of the extension that holds source files, with those files' names; a
    subpackage's `__init__.py` goes with its folder (its row describes the folder's API) and is not listed."""
    folders = {}
    for top in ("dpo_kernels", "csrc"):
        for path in (REPO_ROOT / top).rglob("*"):
            if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts:
                folder = path.parent.relative_to(REPO_ROOT).as_posix() + "/"
                files = folders.setdefault(folder, set())
                if path.name != "__init__.py" or folder == "dpo_kernels/":
                    files.add(path.name)
    return folders


def test_every_source_file_is_named_in_its_folders_row():
    rows = layout_rows()
    for folder, files in source_folders().items():
        assert folder in rows, f"docs/design.md, Layout: no row for {folder}"
        missing = files - named_files(rows[folder])
        assert not missing, f"docs/design.md, Layout: {folder} does not name {sorted(missing)}"


def test_every_file_the_table_names_exists():
    folders = source_folders()
    for folder, cells in layout_rows().items():
        if folder.startswith(("dpo_kernels/", "csrc/")):
            stale = named_files(cells) - folders.get(folder, set())
            assert not stale, f"docs/design.md, Layout: {folder} names {sorted(stale)}, which are not there"


def test_the_readme_links_to_the_table_and_keeps_none_of_its_own():
    readme = (REPO_ROOT / "README.md").read_text()
    section = re.search(r"^## Layout\n(.*?)^## ", readme, re.MULTILINE | re.DOTALL).group(1)
    assert "(docs/design.md#layout)" in section
    assert "|" not in section
