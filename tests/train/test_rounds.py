"""Self-training rounds (`pipeline.rounds`): the node chain, chained fingerprints, and reuse when rounds grow.

Reuse is decided by the fingerprint at a fixed per-round path (`<root>/<node>/<fingerprint>`), so equal planned
fingerprints are what a re-run reuses; two tiny rounds end to end took over 3 minutes on the shared CPU box, so
there is no end-to-end run here.
"""

from __future__ import annotations

import pytest

from pipeline import dag
from pipeline.config import ConfigError
from pipeline.planning import plan_fingerprints
from pipeline.rounds import expand_rounds
from pipeline.run import compose

TINY = ["executor=local", "toy.train_images=4", "toy.val_images=2", "toy.size=64",
        "wordgrid.num_samples=32", "wordgrid.samples_per_shard=32", "train_ifseg.ifseg.label_size=16",
        "train_ifseg.batch_size=4", "train_ifseg.loop.steps=2", "train_ifseg_st.batch_size=2",
        "train_ifseg_st.image_size=64", "train_ifseg_st.loop.steps=2", "selftrain.report.enabled=false"]


def plan(root, rounds: int, *extra: str) -> tuple[dict, dict]:
    cfg = compose("demo", [f"output_root={root}", *TINY, f"train_ifseg_st.rounds={rounds}",
                           f"stages=[{'train_ifseg_st' if rounds == 1 else f'train_ifseg_st_r{rounds}'}]", *extra])
    nodes = dag.build_nodes(cfg)
    return nodes, plan_fingerprints(nodes, cfg)


def test_two_rounds_chain_teacher_relabel_student(tmp_path):
    nodes, fingerprints = plan(tmp_path, 2)
    assert nodes["selftrain_r2"].inputs == {"model": "train_ifseg_st"}
    assert nodes["train_ifseg_st_r2"].inputs == {"images": "selftrain_r2", "init": "train_ifseg_st"}
    assert nodes["selftrain"].inputs == {"model": "train_ifseg"}  # round 1 as the preset wrote it
    assert "rounds" not in nodes["train_ifseg_st"].config and "rounds" not in nodes["train_ifseg_st_r2"].config
    assert nodes["train_ifseg_st_r2"].config["loop"] == nodes["train_ifseg_st"].config["loop"]
    assert "selftrain_r3" not in nodes
    chain = ["train_ifseg", "selftrain", "train_ifseg_st", "selftrain_r2", "train_ifseg_st_r2"]
    assert len({fingerprints[name] for name in chain}) == 5
    # fingerprints chain: a round-1 student knob changes both round-2 nodes, not round 1's labeller
    _, changed = plan(tmp_path, 2, "train_ifseg_st.loop.steps=3")
    assert changed["selftrain"] == fingerprints["selftrain"]
    assert all(changed[name] != fingerprints[name] for name in chain[2:])
    # adding round 3 keeps rounds 1-2 (rounds is not part of any fingerprint)
    _, three = plan(tmp_path, 3)
    assert all(three[name] == fingerprints[name] for name in chain)
    assert three["train_ifseg_st_r3"] not in fingerprints.values()


def test_rounds_need_a_self_training_student():
    with pytest.raises(ConfigError, match="train_ifseg.rounds=2: rounds apply to a train node"):
        expand_rounds({"wordgrid": {"stage": "wordgrid"},
                       "train_ifseg": {"stage": "train", "rounds": 2, "inputs": {"grids": "wordgrid"}}})
    with pytest.raises(ConfigError, match="integer >= 1"):
        expand_rounds({"t": {"stage": "train", "rounds": 0}})
