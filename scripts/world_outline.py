"""Write the dashboard's map outline (``coordinator/dashboard/world.svg``) from Natural Earth.

The dashboard may load nothing from the internet, so it ships the world's land outline: this
script turns Natural Earth's 1:110m land (public domain), as TopoJSON in the npm package
``world-atlas`` 2.0.2 (``land-110m.json``), into one SVG path in longitude / negated latitude
(equirectangular, viewBox -180 -90 360 180), to 0.1 degree. Run once when the outline should
change; the output is committed:

    npm pack world-atlas@2.0.2 && tar xzf world-atlas-2.0.2.tgz
    python scripts/world_outline.py package/land-110m.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "src/idlefleet/coordinator/dashboard/world.svg"


def decode_arcs(topology: dict[str, Any]) -> list[list[tuple[float, float]]]:
    """TopoJSON's quantised, delta-encoded arcs as absolute (lon, lat) points."""
    (sx, sy), (tx, ty) = topology["transform"]["scale"], topology["transform"]["translate"]
    arcs = []
    for arc in topology["arcs"]:
        x = y = 0
        points = []
        for dx, dy in arc:
            x, y = x + dx, y + dy
            points.append((x * sx + tx, y * sy + ty))
        arcs.append(points)
    return arcs


def ring(arcs: list[list[tuple[float, float]]], indexes: list[int]) -> list[tuple[float, float]]:
    points: list[tuple[float, float]] = []
    for i in indexes:
        arc = arcs[i] if i >= 0 else arcs[~i][::-1]
        points.extend(arc if not points else arc[1:])
    return points


def path_of(points: list[tuple[float, float]]) -> str:
    out: list[str] = []
    last = None
    for lon, lat in points:
        here = (round(lon, 1), round(-lat, 1))
        if here != last:
            out.append(f"{here[0]:g} {here[1]:g}")
            last = here
    return "M" + "L".join(out) + "Z" if len(out) > 2 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("land", type=Path, help="world-atlas's land-110m.json")
    args = parser.parse_args()
    topology = json.loads(args.land.read_text())
    arcs = decode_arcs(topology)
    rings: list[str] = []
    for geometry in topology["objects"]["land"]["geometries"]:
        polygons = geometry["arcs"] if geometry["type"] == "MultiPolygon" else [geometry["arcs"]]
        for polygon in polygons:
            rings.extend(p for p in (path_of(ring(arcs, r)) for r in polygon) if p)
    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="-180 -90 360 180">'
        "<!-- Natural Earth 1:110m land (public domain), via world-atlas 2.0.2; "
        "made by scripts/world_outline.py -->"
        f'<path id="land" d="{"".join(rings)}"/></svg>\n'
    )
    OUT.write_text(svg)
    print(f"{OUT}: {len(rings)} rings, {len(svg):,} bytes")


if __name__ == "__main__":
    main()
