"""Demo results: one `demo.json` per paper, and the table that `make demo` prints and puts into the README.

    python -m common.demo write OUT --paper advent --metric mIoU --seconds 212 \
        --row source-only OUT/src_s0/eval.json OUT/src_s1/eval.json OUT/src_s2/eval.json \
        --row AdvEnt OUT/adv_s0/eval.json OUT/adv_s1/eval.json OUT/adv_s2/eval.json
    python -m common.demo table outputs/demo [--out outputs/demo/table.md] [--readme README.md]

`write` reads the metric (a key of each eval.json, dotted for nested keys) from one eval.json per seed and writes
OUT/demo.json = {"paper", "metric", "rows": [{"method", "value" (mean over seeds), "values" (per seed)}],
"seconds"}. `table` gathers every demo.json below a folder into one table (paper, method, metric, value, wall
time), prints it, writes it to --out, and with --readme (the maintainers' `make readme`) replaces the README's
demo table between its markers; a user's `make demo` changes no tracked file.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

BEGIN, END = "<!-- demo-table:begin -->", "<!-- demo-table:end -->"


def read_metric(path, key):
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"demo: {path} not found (did the run before it fail?)")
    value = json.loads(path.read_text())
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise SystemExit(f"demo: {path} has no metric '{key}'")
        value = value[part]
    return float(value)


def make_demo(paper, metric, rows, seconds):
    """The demo.json dict from {method: [per-seed values]}."""
    return {"paper": paper, "metric": metric, "seconds": round(float(seconds)),
            "rows": [{"method": method, "value": round(statistics.fmean(values), 2),
                      "values": [round(v, 2) for v in values]} for method, values in rows.items()]}


def format_table(demos):
    """Markdown table of several demo.json dicts."""
    lines = ["| paper | method | metric | value | per seed | wall time |", "|---|---|---|---|---|---|"]
    for demo in demos:
        for row in demo["rows"]:
            values = row["values"]
            spread = f" (±{statistics.pstdev(values):.1f})" if len(values) > 1 else ""
            minutes, secs = divmod(int(demo["seconds"]), 60)
            lines.append(f"| {demo['paper']} | {row['method']} | {demo['metric']} | {row['value']:.1f}{spread} | "
                         f"{', '.join(f'{v:.1f}' for v in values)} | {minutes}m{secs:02d}s |")
    return "\n".join(lines)


def replace_between_markers(text, block):
    if BEGIN not in text or END not in text:
        raise SystemExit(f"demo: the README has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write OUT/demo.json from per-seed eval.json files")
    write.add_argument("out")
    write.add_argument("--paper", required=True)
    write.add_argument("--metric", required=True)
    write.add_argument("--seconds", type=float, required=True)
    write.add_argument("--row", nargs="+", action="append", required=True, metavar=("METHOD", "EVAL_JSON"),
                       help="a method name followed by one eval.json per seed")
    table = sub.add_parser("table", help="print the table of every demo.json below a folder")
    table.add_argument("root")
    table.add_argument("--out", help="also write the table (markdown) to this file")
    table.add_argument("--readme", help="also replace the README's demo table")
    args = parser.parse_args(argv)

    if args.command == "write":
        rows = {}
        for method, *files in args.row:
            if not files:
                raise SystemExit(f"demo: --row {method} names no eval.json")
            rows[method] = [read_metric(f, args.metric) for f in files]
        demo = make_demo(args.paper, args.metric, rows, args.seconds)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.json").write_text(json.dumps(demo, indent=2) + "\n")
        print(format_table([demo]))
    else:
        demos = [json.loads(p.read_text()) for p in sorted(Path(args.root).glob("*/demo.json"))]
        if not demos:
            raise SystemExit(f"demo: no demo.json below {args.root}")
        block = format_table(demos)
        print(block)
        if args.out:
            Path(args.out).write_text(block + "\n")
        if args.readme:
            readme = Path(args.readme)
            readme.write_text(replace_between_markers(readme.read_text(), block))
    return 0


if __name__ == "__main__":
    sys.exit(main())
