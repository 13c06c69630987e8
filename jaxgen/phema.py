"""Reconstruct power-function EMAs of any length from a run's snapshots (EDM2 post-hoc EMA).

    python -m jaxgen.phema --workdir RUN --sigma-rel 0.05,0.10,0.15 --out OUT

reads the snapshots ``RUN/phema/phema-<t>-<sigma_rel>.npz`` (or those in
``--snapshots DIR``), solves the least-squares weights of Karras et al.
(2024, Algorithm 3) and writes ``OUT/phema-<t>-<sigma_rel>.npz`` per value:
the EMA parameters at the latest snapshot time (or ``--t``), in the snapshot
format (:func:`jaxgen.train.phema.load_snapshot` reads them back as a tree).
Existing outputs are never overwritten.
"""

from __future__ import annotations

import argparse

from jaxgen import cli
from jaxgen.errors import InputError
from jaxgen.files import as_path, check_outputs, check_writable
from jaxgen.train.phema import (
    list_snapshots,
    reconstruct,
    save_snapshot,
    sigma_rel_to_gamma,
    snapshot_folder,
    snapshot_name,
)


def _sigma_rels(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise InputError(
            f"--sigma-rel {text!r}: give comma-separated numbers, e.g. 0.05,0.1."
        ) from None
    if not values:
        raise InputError("--sigma-rel: give at least one value, e.g. 0.05,0.1.")
    sigma_rel_to_gamma(values)  # range check, one line
    return values


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m jaxgen.phema", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training run; snapshots are read from WORKDIR/phema")
    src.add_argument("--snapshots", help="folder of phema-<t>-<sigma_rel>.npz snapshots")
    p.add_argument("--sigma-rel", required=True, help="comma-separated EMA lengths, e.g. 0.05,0.1")
    p.add_argument("--out", required=True, help="folder to write the reconstructions into")
    p.add_argument("--t", type=int, help="snapshot time (updates) to reconstruct at; default last")
    args = p.parse_args(argv)
    sigma_rels = _sigma_rels(args.sigma_rel)
    folder = as_path(args.snapshots) if args.snapshots else snapshot_folder(args.workdir)
    snapshots = list_snapshots(folder)
    t = args.t if args.t is not None else snapshots[-1].t
    check_outputs({"--out": args.out}, read_folders={"the snapshot folder": folder})
    check_writable(args.out, "--out", folder=True)
    targets = {s: as_path(args.out) / snapshot_name(t, s) for s in sigma_rels}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing:
        raise InputError(f"--out: {existing[0]} exists; remove it or write to another folder.")
    for sigma_rel, params in reconstruct(snapshots, sigma_rels, t):
        path = save_snapshot(args.out, params, t, sigma_rel)
        print(f"wrote {path} (sigma_rel {sigma_rel:.3f}, t {t})")
    return 0


if __name__ == "__main__":
    cli.run(main)
