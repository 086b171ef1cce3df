"""Every ``>>>`` example in the library's docstrings runs, and passes, as part of the suite.

One test per module of ``grace_lightning`` (found by walking the package, so a new module is covered without
editing this file), plus a guard that the walk found examples at all, so the suite cannot pass vacuously.
``Example::`` blocks without ``>>>`` are prose and are not run.
"""

import doctest
import importlib
import pkgutil

import pytest

import grace_lightning
from tests.graph_data import one_faiss_thread  # noqa: F401 (a fixture)

MODULES = sorted(info.name for info in pkgutil.walk_packages(grace_lightning.__path__, "grace_lightning."))

# Modules known to hold examples: if one of them stops reporting any, the collection (not the docs) broke.
WITH_EXAMPLES = (
    "grace_lightning.clustering",
    "grace_lightning.knn",
    "grace_lightning.propagation",
    "grace_lightning.strategies.apportion",
    "grace_lightning.strategies.gip",
    "grace_lightning.strategies.grip",
    "grace_lightning.strategies.group_mates",
    "grace_lightning.submodular",
    "grace_lightning.validation",
)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _run(name: str) -> doctest.TestResults:
    module = importlib.import_module(name)
    return doctest.testmod(module, report=True, optionflags=doctest.ELLIPSIS)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name):
    result = _run(name)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (see stdout)"


def test_the_examples_were_found():
    assert set(WITH_EXAMPLES) <= set(MODULES)
    attempted = {name: _run(name).attempted for name in WITH_EXAMPLES}
    assert all(attempted.values()), f"no docstring example was collected from {[n for n, a in attempted.items() if not a]}"
