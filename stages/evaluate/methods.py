"""Eval methods as data: each `methods[i]` entry is a typed `MethodEntry`, resolved into a `MethodSpec` with the
protocol it is scored under.

A method's protocol is the preset `protocol` (the method's own, else the stage's) updated first by the stage's
`protocol_overrides` (dataset facts such as ZSSeg's 512 short side on VOC) and then by the method's own
`protocol_overrides`. IFSeg's K-NN post-processing (`knn`) is a property of image-free models: a `trained`
method takes the method's `knn` when set, else the protocol's `knn_postprocess` (a trained model that is not
IFSeg's ignores it: its predictor reports `knn` false); the `maskclip` baseline post-processes only when its
`knn` is true (IFSeg's MaskCLIP† rows); `labels` never do, and asking them to is a configuration error. The
resolved protocol, with the `knn_postprocess` the predictor applied, is recorded next to the method's metrics.

The seen-class penalty is the trained model's own: a predictor that prescribes one (`seen_penalty`, e.g.
ZegCLIP's `eval_seen_penalty`, 0.1 after inductive and 0.0 after transductive training, as the release) replaces
the preset's value on the worker (`effective_protocol`), so a preset cannot score a transductive model with the
inductive penalty. A `seen_penalty` written in the stage's or the method's `protocol_overrides` is an explicit
choice (an ablation) and wins; the metrics record the value used and where it came from.

Everything is checked on the driver, torch-free, before any work: a typo in an entry (`eval.methods[0].knnn`,
`eval.methods[0].clip.pretraind`), a protocol key or value, a kind or a port is a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ConfigError, build_config, checked_templates
from pipeline.metrics import MIOU_DENOMINATORS
from pipeline.models.configs import ClipConfig
from pipeline.predict.predictors import LABEL_KINDS, method_kinds
from pipeline.predict.protocol import Protocol, build_protocol, protocol_fields

METHOD_NAME = re.compile(r"^[A-Za-z0-9_-]{1,50}$")
KINDS_WITH_INPUT = ("trained", *LABEL_KINDS)
KNN_KINDS = ("trained", "maskclip")
RESERVED_NAMES = frozenset({"json", "gt", "image"})


@dataclass
class MethodEntry:
    """One method of an eval node (an item of `<node>.methods`).

    Attributes:
        name: method name; also the prediction file `<name>.png` of each sample.
        kind: "maskclip", "trained", "labels" or a kind registered in `PREDICTOR_BUILDERS`.
        input: upstream port the method reads (trained, labels).
        knn: IFSeg's K-NN post-processing (trained, maskclip); None = the protocol's `knn_postprocess` for
            trained methods, off for maskclip.
        clip: the MaskCLIP baseline's CLIP (`ClipConfig`; the stage sets its device).
        templates: the MaskCLIP baseline's prompt-template set (`pipeline.models.prompts`; MaskCLIP's 85).
        name_variant: the MaskCLIP baseline's vocabulary name variant (classes without one use their official name).
        logit_scale: the MaskCLIP baseline's multiplier of cosine similarities.
        protocol: protocol preset; None = the stage's.
        protocol_overrides: protocol fields applied after the stage's overrides.
        miou_denominator: "mmseg" or "zsseg"; None = the stage's.
    """

    name: str
    kind: str
    input: str | None = None
    knn: bool | None = None
    clip: ClipConfig = field(default_factory=ClipConfig)
    templates: str = "maskclip85"
    name_variant: str | None = "maskclip"
    logit_scale: float = 100.0
    protocol: str | None = None
    protocol_overrides: dict[str, Any] = field(default_factory=dict)
    miou_denominator: str | None = None


@dataclass(frozen=True)
class MethodSpec:
    """One validated eval method.

    Attributes:
        entry: the method's entry, with the effective `knn` (what the predictor builder receives).
        protocol: the resolved test-time protocol (with the effective `knn_postprocess`).
        miou_denominator: "mmseg" (nanmean over classes with GT) or "zsseg" (detectron2's denominator).
        penalty_from_model: False when `protocol_overrides` set `seen_penalty` explicitly; else a predictor's
            own `seen_penalty` replaces the preset's (`effective_protocol`).
    """

    entry: MethodEntry
    protocol: Protocol
    miou_denominator: str
    penalty_from_model: bool = True

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def kind(self) -> str:
        return self.entry.kind

    @property
    def input(self) -> str | None:
        return self.entry.input

    @property
    def is_labels(self) -> bool:
        """True when the method reads upstream label maps instead of predicting logits."""
        return self.kind in LABEL_KINDS

    def record(self) -> dict[str, Any]:
        """JSON-safe description stored with the metrics."""
        return {"kind": self.kind, "input": self.input, "protocol": dataclasses.asdict(self.protocol),
                "miou_denominator": self.miou_denominator, "penalty_from_model": self.penalty_from_model}


def effective_protocol(spec: MethodSpec, predictor: Any) -> Protocol:
    """The protocol `spec` is scored under, with the seen penalty its model prescribes and the K-NN it applies.

    Args:
        spec: the validated method.
        predictor: its built predictor; an optional attribute `seen_penalty` (float, or None for none) is the
            trained model's own test-time penalty (ZegCLIP: 0.1 inductive, 0.0 transductive).

    Returns:
        `spec.protocol`, with `seen_penalty` replaced by the predictor's unless the method overrode it explicitly,
        and `knn_postprocess` = the predictor's `knn` (whether it returns K-NN-propagated probabilities).
    """
    protocol = dataclasses.replace(spec.protocol, knn_postprocess=bool(getattr(predictor, "knn",
                                                                               spec.protocol.knn_postprocess)))
    if penalty_source(spec, predictor) != "model":
        return protocol
    return dataclasses.replace(protocol, seen_penalty=float(predictor.seen_penalty))


def penalty_source(spec: MethodSpec, predictor: Any) -> str:
    """Where `effective_protocol`'s seen penalty comes from: "override", "model" or "protocol" (the preset)."""
    if not spec.penalty_from_model:
        return "override"
    return "protocol" if getattr(predictor, "seen_penalty", None) is None else "model"


def parse_entry(method: Any, key: str, ports: Set[str]) -> MethodEntry:
    """The typed entry of one `methods[i]` mapping (`key` names it in errors, e.g. "eval.methods[0]")."""
    if not isinstance(method, Mapping) or "name" not in method or "kind" not in method:
        raise ConfigError(f"{key} must be a mapping with at least `name` and `kind`, got {method!r}")
    entry = build_config(MethodEntry, method, key)
    if not METHOD_NAME.match(entry.name) or entry.name in RESERVED_NAMES:
        raise ConfigError(f"{key}.name={entry.name!r}: use 1-50 characters of [A-Za-z0-9_-], not "
                          f"{sorted(RESERVED_NAMES)}")
    if entry.kind not in method_kinds():
        raise ConfigError(f"{key}.kind={entry.kind!r}: choose one of {sorted(method_kinds())}")
    if entry.kind in KINDS_WITH_INPUT and entry.input not in ports:
        raise ConfigError(f"{key}.input={entry.input!r}: a {entry.kind!r} method reads an upstream port; set "
                          f"{key}.input to one of this node's inputs {sorted(ports)} (add it under inputs: first)")
    if entry.knn and entry.kind not in KNN_KINDS:
        raise ConfigError(f"{key}.knn=true: K-NN post-processing applies to {KNN_KINDS} methods only; remove it")
    if entry.kind == "maskclip":
        checked_templates(entry.templates, f"{key}.templates")
    return entry


def parse_method(method: Any, key: str, ports: Set[str], default_protocol: str,
                 stage_overrides: Mapping[str, Any], miou_denominator: str) -> MethodSpec:
    """Validate one method entry and resolve its protocol, K-NN switch and mIoU denominator."""
    entry = parse_entry(method, key, ports)
    denominator = entry.miou_denominator or miou_denominator
    if denominator not in MIOU_DENOMINATORS:
        raise ConfigError(f"{key}.miou_denominator={denominator!r}: choose one of {MIOU_DENOMINATORS}")
    fields = protocol_fields(entry.protocol or default_protocol, [stage_overrides, entry.protocol_overrides],
                             f"{key}.protocol")
    default = bool(fields.get("knn_postprocess", False)) and entry.kind == "trained"
    knn = bool(default if entry.knn is None else entry.knn) and entry.kind in KNN_KINDS
    protocol = build_protocol({**fields, "knn_postprocess": knn}, f"{key}.protocol")
    explicit = "seen_penalty" in stage_overrides or "seen_penalty" in entry.protocol_overrides
    return MethodSpec(dataclasses.replace(entry, knn=knn), protocol, denominator, penalty_from_model=not explicit)


def parse_methods(methods: Sequence[Any], node: str, ports: Set[str], default_protocol: str,
                  stage_overrides: Mapping[str, Any], miou_denominator: str) -> list[MethodSpec]:
    """Validate every method of node `node`; names must be unique and at least one method is needed."""
    if not methods:
        raise ConfigError(f"{node}.methods is empty; add e.g. {{name: maskclip, kind: maskclip}}")
    specs = [parse_method(m, f"{node}.methods[{i}]", ports, default_protocol, stage_overrides, miou_denominator)
             for i, m in enumerate(methods)]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{node}.methods: names must be unique, got {names}")
    return specs
