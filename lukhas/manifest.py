"""MODULE_MANIFEST.json: the schema (a msgspec Struct) and the checks that bind it to code.

A manifest promises capabilities, emit points, a feature flag and an SLA. `check_manifest`
compares every promise with the code: each capability is an instrumented public function of
the slice's `api` module, their emit points are exactly `matriz_emit_points`, the subjects
are real subject constants, and the feature flag is a known setting that defaults to false
and that the slice's code reads.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Annotated, Literal

import msgspec

import lukhas
from lukhas import subjects
from lukhas.config import KNOWN_VARIABLES, Settings

MANIFEST_NAME = "MODULE_MANIFEST.json"

EmitPointName = Annotated[str, msgspec.Meta(pattern=r"^[A-Z_]+:[a-z_]+:[a-z_.]+$")]
FeatureFlag = Annotated[str, msgspec.Meta(pattern=r"^FEATURE_[A-Z_]+$")]


class Slo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A service level objective: the share of calls that must succeed within `latency_ms`.

    A call is a bad event when it fails (MATRIZ outcome `error`) or takes longer than
    `latency_ms`; the error budget is `1 - objective` of all calls. The observability worker
    alerts on how fast that budget burns (README, "SLOs and burn-rate alerts").
    """

    objective: Annotated[float, msgspec.Meta(gt=0, lt=1)]
    latency_ms: Annotated[float, msgspec.Meta(gt=0)]


class Slas(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    p95_ms: Annotated[float, msgspec.Meta(gt=0)]
    slo: Slo | None = None


class ModuleManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The manifest schema; unknown fields are refused, since a typo here hides a promise."""

    module: Annotated[str, msgspec.Meta(pattern=r"^lukhas(\.[a-z_]+)+$")]
    owner: Annotated[str, msgspec.Meta(pattern=r"^@[\w.-]+$")]
    capabilities: Annotated[list[str], msgspec.Meta(min_length=1)]
    feature_flag: FeatureFlag
    dependencies: list[str]
    slas: Slas
    matriz_emit_points: Annotated[list[EmitPointName], msgspec.Meta(min_length=1)]
    acceptance_checklist: list[str]
    subjects: dict[str, str] = {}
    encoding: Literal["json", "msgpack"] = "json"
    schema_version: str = "1.0.0"


def manifest_paths(root: Path | None = None) -> list[Path]:
    """Every MODULE_MANIFEST.json under `root` (default: the installed `lukhas` package)."""
    return sorted((root or Path(lukhas.__file__).parent).rglob(MANIFEST_NAME))


def load_manifest(path: Path) -> ModuleManifest:
    """Decode and validate one manifest.

    Raises:
        msgspec.DecodeError: it is not JSON or does not match the schema (the message
            names the field, e.g. `$.slas.p95_ms`).
    """
    return msgspec.json.decode(path.read_bytes(), type=ModuleManifest)


def check_slo(slas: Slas) -> list[str]:
    """The SLO is present and at least as strict as the p95 SLA beside it.

    "`objective` of calls within `latency_ms`" implies "p95 within `p95_ms`" only when the
    objective is at least 0.95 and `latency_ms` is at most `p95_ms`; a looser SLO would let
    the burn-rate alerts stay quiet while the promised p95 is broken.
    """
    slo = slas.slo
    if slo is None:
        return ["slas.slo is missing (objective and latency_ms beside p95_ms)"]
    problems = []
    if slo.objective < 0.95:
        problems.append(f"slas.slo.objective {slo.objective:g} is below 0.95, so meeting it "
                        f"does not imply the p95 SLA")
    if slo.latency_ms > slas.p95_ms:
        problems.append(f"slas.slo.latency_ms {slo.latency_ms:g} is over slas.p95_ms "
                        f"{slas.p95_ms:g}")
    return problems


def check_manifest(manifest: ModuleManifest) -> list[str]:
    """Every way `manifest` and the code disagree; empty when they match.

    The code's side is the slice's endpoint declarations (`<module>.endpoints.ENDPOINTS`):
    their capabilities, emit points and subjects, plus the public `api` functions.
    """
    problems: list[str] = []
    try:
        api = importlib.import_module(f"{manifest.module}.api")
        declared_endpoints = importlib.import_module(f"{manifest.module}.endpoints").ENDPOINTS
    except (ImportError, AttributeError) as exc:
        return [f"{manifest.module} has no api module or endpoint declarations: {exc}"]

    by_capability = {ep.capability: ep for ep in declared_endpoints}
    for name in manifest.capabilities:
        fn = getattr(api, name, None)
        if fn is None or not callable(fn):
            problems.append(f"capability {name} is not a function of {api.__name__}")
        if name not in by_capability:
            problems.append(f"capability {name} is served by no declared endpoint")
    undeclared = sorted(set(by_capability) - set(manifest.capabilities))
    if undeclared:
        problems.append(f"endpoint capabilities missing from the manifest: {undeclared}")

    points = {ep.emit_point.name for ep in declared_endpoints}
    declared = set(manifest.matriz_emit_points)
    if points != declared:
        missing, extra = sorted(declared - points), sorted(points - declared)
        problems.append(f"emit points differ: declared only {missing}, in code only {extra}")

    served = {ep.subject: ep.tag for ep in declared_endpoints}
    if manifest.subjects and set(manifest.subjects) != set(served):
        missing, extra = sorted(set(manifest.subjects) - set(served)), sorted(
            set(served) - set(manifest.subjects))
        problems.append(f"subjects differ: manifest only {missing}, served only {extra}")
    problems += [
        f"subject {subject} is tagged {tag!r} in the manifest, {served[subject]!r} in code"
        for subject, tag in manifest.subjects.items()
        if served.get(subject) is not None and served[subject] != tag
    ]

    known_subjects = {
        value for name, value in vars(subjects).items() if name.isupper() and isinstance(value, str)
    }
    problems += [
        f"subject {s} is not a constant in lukhas/subjects.py"
        for s in manifest.subjects if s not in known_subjects
    ]

    problems += check_slo(manifest.slas)

    flag = manifest.feature_flag
    attribute = flag.lower()
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    if flag not in KNOWN_VARIABLES or attribute not in fields:
        problems.append(f"feature flag {flag} is not a setting in lukhas/config.py")
    elif fields[attribute].default is not False:
        problems.append(f"feature flag {flag} does not default to false")
    registry = getattr(importlib.import_module(f"{manifest.module}.registry"), "REGISTRY", None)
    if getattr(registry, "flag", None) != attribute:
        problems.append(f"{manifest.module}.registry is not gated by settings.{attribute}")
    return problems
