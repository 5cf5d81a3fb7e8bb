"""Shared fixtures: tiny random models (fast) and the embedded SmolLM2 (slow)."""

import os
import warnings
from pathlib import Path

import pytest
import torch

from controllens import testing

# ../shared/data beside the checkout, or wherever CONTROLLENS_DATA points
DATA_DIR = Path(
    os.environ.get("CONTROLLENS_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)

torch.set_num_threads(min(2, torch.get_num_threads()))


def data_path(*parts: str) -> Path:
    """A file of the shared data folder, skipping the test when it is absent."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"shared data not found at {path} "
            "(expected ../shared/data or $CONTROLLENS_DATA)"
        )
    return path


@pytest.fixture(scope="session")
def tiny_bridge():
    return testing.tiny_bridge()


@pytest.fixture(scope="session")
def tiny_nnsight():
    return testing.tiny_nnsight()


@pytest.fixture(scope="session")
def tiny_hf():
    return testing.tiny_llama()


@pytest.fixture(scope="session")
def smol_bridge():
    from controllens.models import load_bridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_bridge()


@pytest.fixture(scope="session")
def smol_nnsight():
    from controllens.models import load_nnsight

    return load_nnsight()


@pytest.fixture(scope="session")
def smol_hf():
    from controllens.models import load_hf

    return load_hf()
