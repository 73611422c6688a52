"""Where a kernel's warps stall, by SASS region: reads ncu's source page (per-instruction warp stall
samples) and groups the instructions by how often they ran, which separates a K loop's body (run
once per warp and iteration) from the code every warp runs once (set-up, the pipeline's prologue,
a remainder loop, the epilogue). Prints, per kernel, the regions' shares of the samples with their
main stall reasons, then the most sampled instructions.

On the GPU machine (scripts/device/prof_decode.py runs one forward per preset, backend and M):

    ncu --profile-from-start off --clock-control none --kernel-name regex:moe_gemm --set full \
        --import-source no -o $OUT/r python3 scripts/device/prof_decode.py --presets gpt-oss-120b --tokens 1
    ncu -i $OUT/r.ncu-rep --page source --csv --print-source sass > $OUT/src.csv

Here: python3 scripts/dev/ncu_source.py src.csv [--top 12] [--kernels 2]
"""

import argparse
import collections
import csv

SAMPLES = "Warp Stall Sampling (All Samples)"


def kernels(path):
    """[(kernel name, [row dict per SASS instruction])] in the file's order."""
    out, header = [], None
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 2 and row[0] == "Kernel Name":
                out.append((row[1], []))
            elif row and row[0] == "Address":
                header = row
            elif out and header and len(row) == len(header):
                out[-1][1].append(dict(zip(header, row)))
    return out, [h for h in header or () if h.startswith("stall_") and "Not Issued" not in h]


def num(row, key):
    try:
        return float(row.get(key) or 0)
    except ValueError:
        return 0.0


def opcode(source: str) -> str:
    words = source.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def report(name, rows, reasons, top):
    total = sum(num(r, SAMPLES) for r in rows) or 1.0
    print(f"{name}: {len(rows)} instructions, {total:.0f} samples, "
          f"{sum(num(r, 'Instructions Executed') for r in rows):.0f} warp instructions executed")
    regions = collections.defaultdict(lambda: [0, 0.0, collections.Counter(), collections.Counter()])
    for r in rows:
        reg = regions[r["Instructions Executed"]]
        reg[0] += 1
        reg[1] += num(r, SAMPLES)
        reg[2][opcode(r["Source"])] += 1
        for why in reasons:
            reg[3][why[6:]] += num(r, why)
    for count, (n, samples, ops, why) in sorted(regions.items(), key=lambda kv: -kv[1][1])[:6]:
        print(f"  run {count:>9} times: {n:5d} instructions, {100 * samples / total:5.1f}% of samples; "
              f"stalls {', '.join(f'{k} {v:.0f}' for k, v in why.most_common(4))}; "
              f"ops {', '.join(f'{k} {v}' for k, v in ops.most_common(5))}")
    for r in sorted(rows, key=lambda r: -num(r, SAMPLES))[:top]:
        why = max(reasons, key=lambda k: num(r, k)) if reasons else ""
        print(f"    {100 * num(r, SAMPLES) / total:5.1f}%  x{r['Instructions Executed']:>9}  {why[6:]:<14} "
              f"{r['Source'][:70]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--top", type=int, default=12, help="most sampled instructions to list per kernel")
    ap.add_argument("--kernels", type=int, default=0, help="only the first N kernels (0: all)")
    args = ap.parse_args()
    found, reasons = kernels(args.csv)
    if not found:
        raise SystemExit(f"{args.csv}: no 'Kernel Name' sections (is it ncu's --page source --csv output?)")
    for name, rows in found[:args.kernels or None]:
        report(name, rows, reasons, args.top)


if __name__ == "__main__":
    main()
