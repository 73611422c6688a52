#!/usr/bin/env python3
"""A short table from the text report of `qualify.sh ncu` (ncu's default output of
scripts/device/prof_decode.py): per profiled kernel its duration, instructions, issue slots busy,
cycles per issued instruction, occupancy, registers, memory throughput, and the largest stall
reasons (cycles per issued instruction, from the smsp__average_warps_issue_stalled_* metrics).

    python3 scripts/device/ncu_table.py ncu_decode.txt
"""

import re
import sys

FIELDS = [("us", r"Duration\s+us\s+([\d.,]+)"), ("Minst", r"Executed Instructions\s+inst\s+([\d,]+)"),
          ("issue%", r"Issue Slots Busy\s+%\s+([\d.]+)"),
          ("cyc/iss", r"Warp Cycles Per Issued Instruction\s+cycle\s+([\d.]+)"),
          ("occ%", r"Achieved Occupancy\s+%\s+([\d.]+)"), ("regs", r"Registers Per Thread\s+\S+\s+(\d+)"),
          ("TB/s", r"Memory Throughput\s+Tbyte/s\s+([\d.]+)"), ("grid", r"Grid Size\s+\S*\s+([\d,]+)")]
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio\s+\S+\s+([\d.]+)")


def parse(path):
    rows, header, cur = [], "", None
    for line in open(path, errors="replace"):
        if line.startswith("==="):
            header = line.strip("= \n")
            continue
        m = re.match(r"^  (?:void )?([\w:<>]+).*\(\d+, \d+, \d+\)x\(\d+, \d+, \d+\).*Context", line)
        if m:
            cur = {"call": header, "kernel": m.group(1)[:28], "stalls": {}}
            rows.append(cur)
            continue
        if cur is None:
            continue
        mm = re.match(r"^\s+<\d+,(.+)>\s*$", line)   # --nvtx: the push/pop stack names the call
        if mm and not cur.get("nvtx"):
            cur["nvtx"] = cur["call"] = mm.group(1).strip()
            continue
        for key, pat in FIELDS:
            mm = re.search(pat, line)
            if mm and key not in cur:
                cur[key] = mm.group(1).replace(",", "")
        mm = STALL.search(line)
        if mm:
            cur["stalls"][mm.group(1)] = float(mm.group(2))
    return rows


def main():
    for path in sys.argv[1:]:
        print(f"{'call':34} {'kernel':28} {'us':>7} {'Minst':>6} {'iss%':>5} {'cyc':>5} {'occ%':>5} {'reg':>4} "
              f"{'TB/s':>5}  top stalls (cycles per issue)")
        for r in parse(path):
            minst = f"{int(r['Minst']) / 1e6:.1f}" if "Minst" in r else "-"
            top = sorted(r["stalls"].items(), key=lambda kv: -kv[1])[:5]
            print(f"{r['call'][:34]:34} {r['kernel']:28} {r.get('us', '-'):>7} {minst:>6} {r.get('issue%', '-'):>5} "
                  f"{r.get('cyc/iss', '-'):>5} {r.get('occ%', '-'):>5} {r.get('regs', '-'):>4} {r.get('TB/s', '-'):>5}  "
                  + " ".join(f"{k}={v:.2f}" for k, v in top))


if __name__ == "__main__":
    main()
