"""Reading the slices' MODULE_MANIFEST.json files: which emit point has which p95 SLA."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from lukhas.manifest import load_manifest, manifest_paths

logger = logging.getLogger(__name__)


def load_manifests(root: Path | None = None) -> list[dict[str, Any]]:
    """Every MODULE_MANIFEST.json under `root` (default: the installed `lukhas` package),
    validated by the manifest schema (`lukhas.manifest.load_manifest`) and handed on as plain
    JSON, the form injected manifests take too (the worker reads only the SLA fields).

    Raises:
        ValueError: a manifest is not valid JSON or does not match the schema.
    """
    manifests = []
    for path in manifest_paths(root):
        try:
            manifest = load_manifest(path)
        except msgspec.DecodeError as exc:
            raise ValueError(f"{path}: {exc}") from None
        manifests.append(msgspec.to_builtins(manifest))
    return manifests


def sla_by_emit_point(manifests: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Map each emit point in `matriz_emit_points` to its manifest's `slas.p95_ms`.

    A manifest without `slas.p95_ms` gives its points no SLA. An emit point listed by two
    manifests keeps the stricter SLA.

    Raises:
        ValueError: `slas.p95_ms` is not a positive number, or the emit points are not a
            list of `TYPE:label` strings.
    """
    slas: dict[str, float] = {}
    for manifest in manifests:
        module = manifest.get("module", "<unnamed module>")
        p95 = (manifest.get("slas") or {}).get("p95_ms")
        points = manifest.get("matriz_emit_points") or []
        if not isinstance(points, list) or not all(
            isinstance(p, str) and ":" in p for p in points
        ):
            raise ValueError(f"{module}: matriz_emit_points must be a list of 'TYPE:label'")
        if p95 is None:
            continue
        if isinstance(p95, bool) or not isinstance(p95, int | float) or p95 <= 0:
            raise ValueError(f"{module}: slas.p95_ms must be a positive number, not {p95!r}")
        for point in points:
            if point in slas and slas[point] != p95:
                logger.warning(
                    "emit point %s has SLAs %g and %g ms; using the stricter",
                    point, slas[point], p95,
                )
            slas[point] = min(float(p95), slas.get(point, float(p95)))
    return slas
