"""Algorithm math repeated between algos/ files (so each file reads standalone) must
stay identical to its original: a fix in one copy that misses another fails here."""

import importlib
import inspect

import pytest

COPIES = {  # function: (the original, the files that carry a copy)
    "group_advantages": ("grpo", ["chord", "aapa", "uniapl", "adpo"]),
    "grpo_loss": ("grpo", ["chord", "aapa", "uniapl", "gprl"]),
    "sft_phi_loss": ("chord", ["aapa"]),
    "skew_scores": ("gpm", ["gprl"]),
    "gpm_scores": ("gpm", ["gprl"]),
    "gpm_embed": ("gpm", ["gprl"]),
    "sequence_logps": ("adpo", ["adpo_pairwise"]),
}


@pytest.mark.parametrize("name", sorted(COPIES))
def test_every_copy_is_identical_to_its_original(name):
    original, copies = COPIES[name]
    source = inspect.getsource(getattr(importlib.import_module(f"algos.{original}"), name))
    for module in copies:
        assert inspect.getsource(getattr(importlib.import_module(f"algos.{module}"), name)) == source, \
            f"algos/{module}.py:{name} differs from algos/{original}.py:{name}"


def test_no_other_function_is_defined_twice_without_being_listed():
    seen = {}
    for module in ["sft", "grpo", "chord", "aapa", "uniapl", "adpo", "adpo_pairwise", "gpm", "gprl"]:
        for name, function in inspect.getmembers(importlib.import_module(f"algos.{module}"), inspect.isfunction):
            if function.__module__ == f"algos.{module}":
                seen.setdefault(name, []).append(module)
    repeated = {name for name, modules in seen.items() if len(modules) > 1}
    assert repeated <= set(COPIES), f"repeated but not checked: {sorted(repeated - set(COPIES))}"
