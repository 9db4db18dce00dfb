"""``dino neighbours`` (the nearest images of a key or an image file, by cosine) and ``dino
dedup`` (pairs and groups of near-duplicates), over the embeddings ``dino embed`` wrote."""

from __future__ import annotations

import argparse
import json
import sys

from service.cli.common import positive_int

INDEXES = ("flat", "ivf", "auto")  # service.search.engine.INDEXES (not imported: torch)
INDEX_HELP = ("flat (default): exact, faiss's IndexFlatIP when installed, else a blocked torch "
              "search; ivf: faiss's approximate IndexIVFFlat (needs the search extra); auto: "
              "ivf for large all-pairs scans when faiss is installed")
MAX_GROUPS_SHOWN = 20


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "neighbours", help="the nearest images of a key or an image file, by cosine",
        epilog="--query is a key of the embeddings (it is then its own first neighbour) or "
               "an image file, embedded with the manifest's checkpoint and preprocessing.")
    _embeddings(p)
    p.add_argument("--query", required=True, metavar="IMG|KEY",
                   help="a key of the embeddings, or an image file (local or URL)")
    p.add_argument("-k", type=positive_int, default=10, help="neighbours (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--grid", metavar="PATH.png",
                   help="write a PNG of the query and its neighbours, cosine under each")
    p.add_argument("--index", choices=INDEXES, default="flat", help=INDEX_HELP)
    p.set_defaults(fn=cmd_neighbours)

    p = sub.add_parser(
        "dedup", help="pairs and groups of near-duplicate images (cosine >= --threshold)",
        epilog="A group is a connected component of the pairs: a~b and b~c make one group.")
    _embeddings(p)
    p.add_argument("--threshold", type=float, default=0.95,
                   help="the least cosine of a pair (default 0.95)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", metavar="pairs.csv",
                   help="write every pair as CSV (a, b, cosine, group)")
    p.add_argument("--index", choices=INDEXES, default="flat", help=INDEX_HELP)
    p.set_defaults(fn=cmd_dedup)


def _embeddings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True, metavar="OUT",
                   help="the --out folder or URL of `dino embed` (cls or cls+mean features)")


def cmd_neighbours(args: argparse.Namespace) -> int:
    from service.search import find_neighbours, grid_tiles, load_embeddings
    from service.search.grid import write_grid

    emb = load_embeddings(args.embeddings)
    res = find_neighbours(emb, args.query, args.k, args.index)
    if args.grid:
        write_grid(args.grid, grid_tiles(emb, res))
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        q, how = res.query, "exact" if res.index == "flat" else "approximate"
        print(f"neighbours of {q.kind} {q.text} in {res.embeddings} ({len(emb.keys)} rows; "
              f"{res.index} index, {res.engine}, {how})")
        labels = [_label(n.label, n.class_name) for n in res.neighbours]
        kw = max([3, *(len(n.key) for n in res.neighbours)])
        lw = max([5, *(len(x) for x in labels)])
        print(f"{'rank':>4}  {'key':<{kw}}  {'label':<{lw}}  {'cosine':>7}")
        for n, label in zip(res.neighbours, labels):
            print(f"{n.rank:>4}  {n.key:<{kw}}  {label:<{lw}}  {n.cosine:>7.4f}")
    if args.grid:
        print(f"wrote the grid of {len(res.neighbours) + 1} images to {args.grid}",
              file=sys.stderr)
    return 0


def _label(label: int | None, name: str | None) -> str:
    if label is None:
        return "-"
    return f"{label} ({name})" if name else str(label)


def cmd_dedup(args: argparse.Namespace) -> int:
    from service.search import find_duplicates, load_embeddings
    from service.storage import write_bytes

    res = find_duplicates(load_embeddings(args.embeddings), args.threshold, args.index)
    if args.out:
        write_bytes(args.out, res.to_csv().encode())
    if args.json:
        print(json.dumps(res.to_json()))
        print(res.summary(), file=sys.stderr)
    else:
        print(res.summary())
        for g, keys in enumerate(res.groups[:MAX_GROUPS_SHOWN]):
            print(f"  group {g} ({len(keys)}): {', '.join(keys)}")
        if len(res.groups) > MAX_GROUPS_SHOWN:
            print(f"  ... {len(res.groups) - MAX_GROUPS_SHOWN} more groups (all in --json"
                  + (f" and {args.out})" if args.out else ", and each pair in --out pairs.csv)"))
    if args.out:
        print(f"wrote {len(res.pairs)} pairs to {args.out}", file=sys.stderr)
    return 0
