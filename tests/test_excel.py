"""profile=excel opened by a real spreadsheet program: LibreOffice, headless, converts the CSV
to ODS, whose cells say what it made of each field."""

import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.support.database import ExportDatabase, run_sql
from tests.support.server import Server

SOFFICE = shutil.which("soffice")

ROWS = [
    ("Zoë Ångström, ĳ 😀", "1.5"),
    ("=1+1", "-2"),
    ("@SUM(A1)", "3"),
    ("+1+1", "-1.5"),
    (" -1+1", "0"),
    # Issue 14: after a no-break or ideographic space, and full-width.
    ("\u00a0=1+1", "1"),
    ("\u3000+1+1", "2"),
    ("\uff1d1+1", "3"),
    ("\uff20SUM(A1)", "4"),
]


def _cells(ods: Path) -> list[tuple[str, str, bool]]:
    """(value type, text, is a formula) of every cell, row by row."""
    content = zipfile.ZipFile(ods).read("content.xml").decode()
    cells = re.findall(r"<table:table-cell ([^>]*)>(?:<text:p>([^<]*)</text:p>)?", content)
    unescape = {"&apos;": "'", "&quot;": '"', "&lt;": "<", "&gt;": ">", "&amp;": "&"}
    out = []
    for attributes, text in cells:
        kind = re.search(r'office:value-type="(\w+)"', attributes)
        for entity, char in unescape.items():
            text = text.replace(entity, char)
        out.append((kind.group(1) if kind else "", text, "table:formula" in attributes))
    return out


def _open_in_libreoffice(csv: bytes, tmp_path: Path) -> list[tuple[str, str, bool]]:
    assert SOFFICE is not None
    source = tmp_path / "export.csv"
    source.write_bytes(csv)
    # Comma, double quote, UTF-8 (76), from line 1: headless LibreOffice takes the character
    # set from its options or the locale, not from the byte order mark that Excel reads.
    subprocess.run(
        [SOFFICE, "--headless", "--infilter=CSV:44,34,76,1", "--convert-to", "ods"]
        + ["--outdir", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=120,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    return _cells(tmp_path / "export.ods")


@pytest.mark.skipif(SOFFICE is None, reason="LibreOffice (soffice) is not installed")
def test_excel_profile_opens_without_formulas_and_with_its_accents(
    server: Server, database: ExportDatabase, tmp_path: Path
) -> None:
    run_sql(
        database.url,
        "CREATE TABLE excel_check (id integer PRIMARY KEY, name text, amount numeric)",
        "INSERT INTO excel_check VALUES "
        + ", ".join(f"({i}, '{name}', {amount})" for i, (name, amount) in enumerate(ROWS)),
    )
    try:
        with server.client(database.key) as client:
            excel = client.get(
                "/datasets/excel_check.csv", params={"profile": "excel", "select": "name,amount"}
            )
            plain = client.get("/datasets/excel_check.csv", params={"select": "name,amount"})
    finally:
        run_sql(database.url, "DROP TABLE excel_check")
    assert excel.content.startswith(b"\xef\xbb\xbfname,amount\r\n")

    (tmp_path / "excel").mkdir()
    cells = _open_in_libreoffice(excel.content, tmp_path / "excel")
    assert not any(formula for _, _, formula in cells)
    assert cells[:2] == [("string", "name", False), ("string", "amount", False)]
    names = [text for kind, text, _ in cells[2::2]]
    amounts = [(kind, text) for kind, text, _ in cells[3::2]]
    assert names == [
        "Zoë Ångström, ĳ 😀",
        "'=1+1",
        "'@SUM(A1)",
        "'+1+1",
        "' -1+1",
        "'\u00a0=1+1",
        "'\u3000+1+1",
        "'\uff1d1+1",
        "'\uff20SUM(A1)",
    ]
    # Numbers stay numbers.
    assert amounts == [("float", a) for _, a in ROWS]

    # The control: the same rows without the profile do run formulas in the same program.
    (tmp_path / "plain").mkdir()
    unprotected = _open_in_libreoffice(plain.content, tmp_path / "plain")
    assert any(formula for _, _, formula in unprotected)
