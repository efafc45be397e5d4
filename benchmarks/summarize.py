"""Prints the compact table of benchmarks/gpu_check.sh from pytest-benchmark JSON files:
per op and shape the eager, compiled and fused medians, the fused speed-ups, and the fused op's
achieved bandwidth as a share of the measured copy bandwidth."""

import json
import os
import sys
from collections import defaultdict


def main(out_dir: str, benches: list[str]) -> None:
    copy_gbps = None
    path = os.path.join(out_dir, "copy_bw.txt")
    if os.path.exists(path):
        for line in open(path):
            if line.startswith("copy_GBps"):
                copy_gbps = float(line.split()[1])
    print(f"copy bandwidth (read + write): {copy_gbps} GB/s")
    header = f"{'op':<22}{'shape':<14}{'eager ms':>10}{'compiled ms':>13}{'fused ms':>10}{'x eager':>9}{'x comp':>8}"
    header += f"{'fused GB/s':>11}{'% copy':>8}{'peak MB':>9}"
    print(header)
    for bench in benches:
        name = os.path.splitext(os.path.basename(bench))[0]
        path = os.path.join(out_dir, f"{name}.json")
        if not os.path.exists(path):
            print(f"{name}: no results")
            continue
        rows = defaultdict(dict)
        for b in json.load(open(path))["benchmarks"]:
            info = b.get("extra_info", {})
            key = (info.get("op", name), info.get("shape", b["param"] if "param" in b else b["group"]))
            key = (info.get("op", name), f"B{info.get('B')}xT{info.get('T')}") if "B" in info else key
            rows[key][info.get("impl", "?")] = (b["stats"]["median"], info)
        for (op, shape), impls in rows.items():
            med = {k: v[0] for k, v in impls.items()}
            fused = impls.get("fused", (None, {}))
            gbps = fused[1].get("GB/s")
            ms = lambda k, med=med: f"{med[k] * 1e3:.3f}" if k in med else "-"
            ratio = lambda k, med=med: f"{med[k] / med['fused']:.1f}" if k in med and "fused" in med else "-"
            share = f"{100 * gbps / copy_gbps:.0f}" if gbps and copy_gbps else "-"
            peak = fused[1].get("peak_extra_mem_mb")
            line = f"{op:<22}{shape:<14}{ms('eager'):>10}{ms('compiled'):>13}{ms('fused'):>10}{ratio('eager'):>9}"
            line += f"{ratio('compiled'):>8}{(f'{gbps:.0f}' if gbps else '-'):>11}{share:>8}"
            line += f"{(f'{peak:.1f}' if peak is not None else '-'):>9}"
            print(line)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
