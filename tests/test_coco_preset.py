"""The coco preset wires each paper's protocol: composed config and DAG inspected, no model run."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import dag
from pipeline.data.vocab import load_vocab
from pipeline.planning import driver_stage
from pipeline.run import compose


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    """An empty COCO-Stuff layout (the adapters check that the folders exist)."""
    root = tmp_path_factory.mktemp("coco")
    for split in ("train2017", "val2017"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def coco(coco_root) -> dict:
    return compose("coco", [f"coco_root={coco_root}"])


def upstream_chain(nodes: dict[str, dag.Node], name: str) -> dict[str, dict[str, str]]:
    """Every node `name` depends on, with its input ports."""
    chain, pending = {}, [name]
    while pending:
        node = nodes[pending.pop()]
        chain[node.name] = node.inputs
        pending.extend(node.inputs.values())
    return chain


def test_ifseg_table1_unseen15_is_trained_on_grids_of_the_15_unseen_words(coco):
    nodes = dag.build_nodes(coco)
    assert upstream_chain(nodes, "eval_unseen15") == {
        "eval_unseen15": {"ifseg": "train_ifseg_unseen15"},
        "train_ifseg_unseen15": {"grids": "wordgrid_unseen15"},
        "wordgrid_unseen15": {},
    }
    assert nodes["wordgrid_unseen15"].kind == "wordgrid" and nodes["train_ifseg_unseen15"].kind == "train"
    assert coco["wordgrid_unseen15"]["vocab"] == coco["train_ifseg_unseen15"]["vocab"] == "coco_unseen_15"
    assert coco["train_ifseg_unseen15"]["method"] == "ifseg"
    for key in ("ifseg", "batch_size", "loop", "name_variant", "prompt_templates"):  # the same recipe as the 171-way
        assert coco["train_ifseg_unseen15"][key] == coco["train_ifseg"][key], key
    for key in ("num_samples", "max_grid_size", "min_grid_size"):
        assert coco["wordgrid_unseen15"][key] == coco["wordgrid"][key], key
    order = dag.topological_order(nodes)
    assert order.index("wordgrid_unseen15") < order.index("train_ifseg_unseen15") < order.index("eval_unseen15")


def test_eval_unseen15_scores_that_model_on_the_same_15_words(coco):
    nodes = dag.build_nodes(coco)
    stage = driver_stage(nodes["eval_unseen15"], coco)
    assert [(m.kind, m.input) for m in stage.methods] == [("trained", "ifseg"), ("maskclip", None)]
    trained_on = load_vocab(coco["train_ifseg_unseen15"]["vocab"])
    assert sorted(stage.eval_vocab.names) == sorted(trained_on.names) and len(trained_on.names) == 15
    assert stage.cfg.gt_filter == "unseen_only"
    assert dag.build_nodes(coco)["eval"].inputs["ifseg"] == "train_ifseg"  # the GZSL row keeps the 171-way model


def test_ifseg_and_its_maskclip_baseline_use_the_same_prompts(coco):
    maskclip = next(m for m in coco["eval"]["methods"] if m["kind"] == "maskclip")
    assert maskclip["name_variant"] == coco["train_ifseg"]["name_variant"] == "ifseg"
    assert maskclip["templates"] == coco["train_ifseg"]["prompt_templates"]
    assert coco["train_ifseg_st"]["name_variant"] == "ifseg"


def test_no_eval_method_of_the_presets_overrides_the_seen_penalty(coco):
    for preset in (coco, compose("demo")):
        for name, node in preset.items():
            if isinstance(node, dict) and node.get("stage") == "eval":
                assert "seen_penalty" not in node.get("protocol_overrides", {}), name
                for method in node["methods"]:
                    assert "seen_penalty" not in method.get("protocol_overrides", {}), (name, method["name"])


def test_zegclip_inductive_and_transductive_rows_read_models_of_their_mode(coco):
    methods = {m["name"]: m for m in coco["eval"]["methods"]}
    ports = coco["eval"]["inputs"]
    assert coco[ports[methods["zegclip"]["input"]]]["zegclip"].get("mode", "inductive") == "inductive"
    assert coco[ports[methods["zegclip_transductive"]["input"]]]["zegclip"]["mode"] == "transductive"
    assert methods["maskclip_knn"]["knn"] is True and methods["maskclip"].get("knn") is None
