"""The documentation: a site MkDocs builds in strict mode (a broken link, a missing anchor or a
page left out of the navigation fails it), and a README short enough to be a landing page whose
links all resolve."""

import re
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO


def test_the_site_builds_strictly_with_every_page_in_its_navigation(tmp_path):
    mkdocs = Path(sys.executable).with_name("mkdocs")
    proc = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    listed = {next(iter(entry.values())) for entry in config["nav"]}
    assert listed == {p.name for p in (REPO / "docs").glob("*.md")}
    page = (tmp_path / "site" / "own-data" / "index.html").read_text()
    assert "A folder of images" in page and "A CSV like NIH" in page and "A DICOM export" in page


def test_the_readme_is_a_landing_page_whose_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links and all((REPO / link).exists() for link in links if "://" not in link), links
    assert "make demo" in text and "make test" in text
