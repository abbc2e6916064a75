"""The installed transformers' MoE model folders, each served (experts/spec.py's family table) or
refused by name with its reason (spec.NOT_SERVED), and the README's two lists equal to those.

A folder is an MoE family when its modeling code names a top-k expert count: found from the code,
so a transformers upgrade that adds a family fails here until the family is served or refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import transformers
from transformers.models.auto.configuration_auto import model_type_to_module_name

from experts.spec import NOT_SERVED, SUPPORTED_MODEL_TYPES, TEXT_MODELS, spec_from_config
from protos.errors import UnsupportedModelError

README = Path(__file__).resolve().parents[3] / "README.md"
MARKERS = re.compile(r"num_experts_per_tok|moe_topk|num_selected_experts|expert_capacity|router_top_k|top_k_experts")


def moe_folders() -> set[str]:
    """Model folders of the installed transformers whose modeling code names a top-k expert count."""
    root = Path(transformers.__file__).parent / "models"
    return {path.parent.name for path in root.glob("*/modeling_*.py") if MARKERS.search(path.read_text())}


SERVED = set(SUPPORTED_MODEL_TYPES) | set(TEXT_MODELS)  # composites: their folder, their text model served
# the model folders of those ("inkling_text" is in the folder "inkling")
SERVED_FOLDERS = {model_type_to_module_name(model_type) for model_type in SERVED}


def _section(header: str) -> list[str]:
    """The rows of the README's table whose header line starts with `header`."""
    lines = README.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[first + 2:]:  # past the header and its |---| line
        if not line.startswith("| `"):
            break
        rows.append(line)
    assert rows, f"no rows under {header!r} in the README"
    return rows


def readme_served() -> set[str]:
    """Model types named in the first column of the README's family table."""
    rows = _section("| family (`model_type`)")
    return {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1]) if name != "text_config"}


def readme_not_served() -> dict[str, str]:
    rows = _section("| model_type not served |")
    return {re.fullmatch(r"`(\w+)`", cells[1].strip()).group(1): cells[2].strip()
            for cells in (row.split("|") for row in rows)}


def test_every_moe_folder_is_served_or_refused_with_its_reason():
    folders = moe_folders()
    assert len(folders) > 40  # the markers still find the families (70+ in transformers 5.23)
    unknown = sorted(folders - SERVED_FOLDERS - set(NOT_SERVED))
    assert not unknown, f"MoE model folders neither served nor in spec.NOT_SERVED: {unknown}"


def test_the_refused_are_moe_folders_and_not_served():
    folders = moe_folders()
    refused_folders = {model_type_to_module_name(model_type) for model_type in NOT_SERVED}
    assert not sorted(refused_folders - folders), "NOT_SERVED names a model type of no MoE folder of transformers"
    assert not set(NOT_SERVED) & (SERVED | SERVED_FOLDERS)
    assert all(len(reason.split()) >= 3 for reason in NOT_SERVED.values())  # a reason, not a word


def test_the_readme_lists_what_the_spec_serves_and_refuses():
    named = readme_served()
    assert named <= SERVED, f"the README's family table names unserved {sorted(named - SERVED)}"
    covered = named | {TEXT_MODELS[n] for n in named if n in TEXT_MODELS}
    missing = sorted(set(SUPPORTED_MODEL_TYPES) - covered)
    assert not missing, f"served, not in the README's family table: {missing}"
    assert readme_not_served() == NOT_SERVED


@pytest.mark.parametrize("model_type", ["doge", "nllb_moe"])
def test_a_refused_family_says_why_by_name(model_type):
    with pytest.raises(UnsupportedModelError) as caught:
        spec_from_config({"model_type": model_type, "hidden_size": 8})
    assert model_type in str(caught.value) and NOT_SERVED[model_type] in str(caught.value)
