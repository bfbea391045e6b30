"""Eval methods as data: validate each `{name, kind, ...}` entry and resolve the protocol it is scored under.

A method's protocol is the preset `protocol` (the method's own, else the stage's) updated first by the stage's
`protocol_overrides` (dataset facts such as ZSSeg's 512 short side on VOC) and then by the method's own
`protocol_overrides`. IFSeg's K-NN post-processing (`knn`) is a property of trained image-free models: a
`trained` method takes the method's `knn` when set, else the protocol's `knn_postprocess`; other kinds never
post-process, and asking them to is a configuration error. The resolved protocol, with the effective
`knn_postprocess`, is recorded next to the method's metrics.

Protocol keys are checked when a method is parsed; values when its `Protocol` is built (`MethodSpec.protocol`),
which imports `pipeline.inference` and so torch: the eval stage does that in `plan()` and on workers, never
while the runner only fingerprints nodes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError
from pipeline.metrics import MIOU_DENOMINATORS
from pipeline.predictors import LABEL_KINDS, method_kinds

if TYPE_CHECKING:
    from pipeline.inference import Protocol

METHOD_NAME = re.compile(r"^[A-Za-z0-9_-]{1,50}$")
METHOD_KEYS = frozenset({"name", "kind", "input", "knn", "clip", "templates", "name_variant", "logit_scale",
                         "protocol", "protocol_overrides", "miou_denominator"})
KINDS_WITH_INPUT = ("trained", *LABEL_KINDS)
KNN_KINDS = ("trained",)
RESERVED_NAMES = frozenset({"json", "gt", "image"})
PROTOCOL_DIR = Path(__file__).resolve().parents[1] / "conf" / "protocol"  # as pipeline.inference.PROTOCOL_DIR


@dataclass(frozen=True)
class MethodSpec:
    """One validated eval method.

    Attributes:
        name: method name; also the prediction file `<name>.png` of each sample.
        kind: "maskclip", "trained", "labels" or a kind registered in `PREDICTOR_BUILDERS`.
        input: upstream port the method reads (trained, labels), else None.
        protocol_cfg: fields of the resolved test-time protocol (with the effective `knn_postprocess`).
        miou_denominator: "mmseg" (nanmean over classes with GT) or "zsseg" (detectron2's denominator).
        options: the method's config as given plus the effective `knn`, passed to the predictor builder.
    """

    name: str
    kind: str
    input: str | None
    protocol_cfg: dict[str, Any]
    miou_denominator: str
    options: dict[str, Any]

    @property
    def protocol(self) -> Protocol:
        """The `Protocol` (built on each access; raises ConfigError on an invalid value)."""
        return build_protocol(self.protocol_cfg, f"methods[{self.name}].protocol")

    @property
    def is_labels(self) -> bool:
        """True when the method reads upstream label maps instead of predicting logits."""
        return self.kind in LABEL_KINDS

    def record(self) -> dict[str, Any]:
        """JSON-safe description stored with the metrics."""
        return {"kind": self.kind, "input": self.input, "protocol": dict(self.protocol_cfg),
                "miou_denominator": self.miou_denominator}


def resolve_protocol_cfg(preset: str, overrides: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """Fields of preset `conf/protocol/<preset>.yaml` with the override mappings applied in order.

    Keys are checked here (torch-free, so driver-side validation stays fast); values are checked when the
    `Protocol` is built (`build_protocol`).
    """
    import yaml

    path = PROTOCOL_DIR / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))
        raise ConfigError(f"{key}={preset!r}: no preset {path}; known presets: {known}")
    fields = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k != "_target_"}
    for override in overrides:
        unknown = sorted(set(override) - set(fields))
        if unknown:
            raise ConfigError(f"{key} overrides: unknown protocol key(s) {unknown}; valid keys: {sorted(fields)}")
        fields.update(override)
    return fields


def build_protocol(fields: Mapping[str, Any], key: str) -> Protocol:
    """`Protocol(**fields)`, a ConfigError naming `key` when a value is invalid."""
    from pipeline.inference import Protocol

    try:
        return Protocol(**dict(fields))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{key}: {error}") from None


def parse_method(method: Mapping[str, Any], key: str, ports: Set[str], default_protocol: str,
                 stage_overrides: Mapping[str, Any], miou_denominator: str) -> MethodSpec:
    """Validate one method entry (`key` names it in errors, e.g. "eval.methods[0]") and resolve its protocol."""
    if not isinstance(method, Mapping) or "name" not in method or "kind" not in method:
        raise ConfigError(f"{key} must be a mapping with at least `name` and `kind`, got {method!r}")
    name, kind = str(method["name"]), method["kind"]
    if not METHOD_NAME.match(name) or name in RESERVED_NAMES:
        raise ConfigError(f"{key}.name={name!r}: use 1-50 characters of [A-Za-z0-9_-], not {sorted(RESERVED_NAMES)}")
    if kind not in method_kinds():
        raise ConfigError(f"{key}.kind={kind!r}: choose one of {sorted(method_kinds())}")
    unknown = sorted(set(method) - METHOD_KEYS)
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; valid keys: {sorted(METHOD_KEYS)}")
    port = method.get("input")
    if kind in KINDS_WITH_INPUT and port not in ports:
        raise ConfigError(f"{key}.input={port!r}: a {kind!r} method reads an upstream port; set {key}.input to one "
                          f"of this node's inputs {sorted(ports)} (add it under inputs: first)")
    denominator = method.get("miou_denominator", miou_denominator)
    if denominator not in MIOU_DENOMINATORS:
        raise ConfigError(f"{key}.miou_denominator={denominator!r}: choose one of {MIOU_DENOMINATORS}")
    protocol = resolve_protocol_cfg(str(method.get("protocol") or default_protocol),
                                    [stage_overrides, method.get("protocol_overrides") or {}], f"{key}.protocol")
    knn = method.get("knn")
    if knn and kind not in KNN_KINDS:
        raise ConfigError(f"{key}.knn=true: K-NN post-processing applies to {KNN_KINDS} methods only; remove it")
    knn = bool(protocol.get("knn_postprocess") if knn is None else knn) and kind in KNN_KINDS
    protocol["knn_postprocess"] = knn
    return MethodSpec(name, kind, port, protocol, denominator, {**dict(method), "knn": knn})


def parse_methods(methods: Sequence[Mapping[str, Any]], node: str, ports: Set[str], default_protocol: str,
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
