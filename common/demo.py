"""Demo results: one `demo.json` per paper, the table that `make demo` prints, and the README's generated blocks.

    python -m common.demo write OUT --paper advent --metric mIoU --seconds 212 \
        --row source-only OUT/src_s0/eval.json OUT/src_s1/eval.json OUT/src_s2/eval.json \
        --row AdvEnt OUT/adv_s0/eval.json OUT/adv_s1/eval.json OUT/adv_s2/eval.json
    python -m common.demo table outputs/demo [--out outputs/demo/table.md]     # make demo
    python -m common.demo readme                                               # make readme (maintainers)
    python -m common.demo check                                                # what tests/test_readme.py runs

`write` reads the metric (a key of each eval.json, dotted for nested keys) from one eval.json per seed and writes
OUT/demo.json = {"paper", "metric", "rows": [{"method", "value" (mean over seeds), "values" (per seed)[, "metric"]}],
"seconds", "cpu_seconds", "load"}: `--row_metric METHOD NAME` names a row's own metric (e.g. PQ beside box AP);
"cpu_seconds" is the CPU time (user + system) of every process the demo script ran before `write` (its shell's
children, from /proc), "load" the machine's 15-minute load average at the end: on a shared machine the wall time
alone misleads. `table` gathers every demo.json below a folder into one table (paper, method, metric, value, wall
time), prints it and writes it to --out; a user's `make demo` changes no tracked file.

`readme` is the maintainers' step that copies results into tracked files, each between markers
`<!-- NAME:begin -->` and `<!-- NAME:end -->`:
- the demo table of outputs/demo/*/demo.json -> docs/demos.md and README.md (block `demo-table`);
- each demo's figure, outputs/demo/<paper>/<paper>.png or else the one PNG directly in that folder ->
  docs/img/<paper>.png, and the README's figure strip of the PNGs under docs/img/ (block `figures`);
- the benchmark table outputs/bench/table.md (`make bench`) -> docs/bench.md and README.md (block `bench-table`).
When outputs/demo holds no demo.json, the demo table and figures are left as they are; otherwise both are rebuilt
from it (a paper without a demo.json or figure there has none in the README). Without outputs/bench/table.md (or
with one from `--quick`) the benchmark table is left as it is. `check` lists every README block that differs
from the file it is copied from, every docs/img figure the README names that does not exist and every relative
link that does not resolve.
"""
import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

from PIL import Image


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


def make_demo(paper, metric, rows, seconds, row_metrics=None, cpu_seconds=None, load=None):
    """The demo.json dict from {method: [per-seed values]} (and {method: metric} for rows with their own)."""
    row_metrics = row_metrics or {}
    demo = {"paper": paper, "metric": metric, "seconds": round(float(seconds)),
            "rows": [{"method": method, "value": round(statistics.fmean(values), 2),
                      "values": [round(v, 2) for v in values],
                      **({"metric": row_metrics[method]} if method in row_metrics else {})}
                     for method, values in rows.items()]}
    if cpu_seconds is not None:
        demo["cpu_seconds"] = round(cpu_seconds)
    if load is not None:
        demo["load"] = round(load, 1)
    return demo


def shell_cpu_seconds():
    """CPU seconds (user + system) of the finished child processes of the shell that runs `write` (the demo script):
    fields cutime and cstime of /proc/<parent>/stat; None where /proc is missing."""
    try:
        fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # fields 16 and 17 of stat(5)


def duration(seconds):
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def format_table(demos):
    """Markdown table of several demo.json dicts."""
    lines = ["| paper | method | metric | value | per seed | wall time (CPU time; load) |",
             "|---|---|---|---|---|---|"]
    for demo in demos:
        time = duration(demo["seconds"])
        extra = [f"CPU {duration(demo['cpu_seconds'])}"] if "cpu_seconds" in demo else []
        extra += [f"load {demo['load']:.1f}"] if "load" in demo else []
        time += f" ({'; '.join(extra)})" if extra else ""
        for row in demo["rows"]:
            values = row["values"]
            spread = f" (±{statistics.pstdev(values):.1f})" if len(values) > 1 else ""
            lines.append(f"| {demo['paper']} | {row['method']} | {row.get('metric', demo['metric'])} | "
                         f"{row['value']:.1f}{spread} | {', '.join(f'{v:.1f}' for v in values)} | {time} |")
    return "\n".join(lines)


PAPERS = ("detr", "pvt", "vistr", "trackformer", "adaptsegnet", "advent", "proda")
TITLES = {"detr": "DETR", "pvt": "PVT", "vistr": "VisTR", "trackformer": "TrackFormer", "adaptsegnet": "AdaptSegNet",
          "advent": "ADVENT", "proda": "ProDA"}
# Generated README blocks copied from a tracked file (the figure strip is made from the PNGs under docs/img/).
SOURCES = {"demo-table": "docs/demos.md", "bench-table": "docs/bench.md"}
FIGURE_WIDTH, WIDE = 420, 3  # the figure strip: pixels per column (two columns); a wide strip's aspect ratio

DEMOS_PAGE = """# Demo results

Generated by `make readme` from `outputs/demo/*/demo.json`, which `make demo` writes; not edited by hand. Each row
is one method of one paper's demo: the mean over seeds (population standard deviation in brackets), every seed, and
the wall time of the whole demo (all seeds and rows), with, where the demo recorded them, the CPU time of all its
processes and the machine's 15-minute load average when it ended (a load above 2 on the 2-core development machine
means the demo shared it: its wall time is then longer than on an idle machine). What each demo runs, its control
rows and every flag that differs from the paper's configuration: the header of `demos/<paper>.sh`; measurements and
discussion: `docs/<paper>.md`.

{block}
"""
BENCH_PAGE = """# Performance table

Generated by `make readme` from `outputs/bench/table.md`, which `make bench` writes; not edited by hand. What each
row and column measures, and the comparison with the official code on the same machine: `performance.md`.

{block}
"""


def markers(name):
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


BEGIN, END = markers("demo-table")


def read_block(text, name, where="the README"):
    """The text between the markers of block `name` (without the newlines next to the markers)."""
    begin, end = markers(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"demo: {where} needs exactly one {begin} ... {end} pair")
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def replace_block(text, name, block, where="the README"):
    read_block(text, name, where)
    begin, end = markers(name)
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}"


def demo_block(demos):
    """The demo table of several demo.json dicts, and a line naming the papers without one."""
    missing = [p for p in PAPERS if p not in {d["paper"] for d in demos}]
    note = f"\n\nNo demo.json for: {', '.join(missing)} (`make demo-<paper>`, then `make readme`)." if missing else ""
    return format_table(demos) + note


def find_figure(folder, paper):
    """The demo's figure: FOLDER/<paper>.png, or else the only PNG directly in FOLDER (None if there is none or
    several)."""
    own = folder / f"{paper}.png"
    if own.is_file():
        return own
    pngs = sorted(folder.glob("*.png"))
    if len(pngs) > 1:
        print(f"demo: {folder} has several PNGs ({', '.join(p.name for p in pngs)}) and no {paper}.png; "
              "no figure taken", file=sys.stderr)
    return pngs[0] if len(pngs) == 1 else None


def figure_strip(root):
    """The README's figure strip: an HTML table of docs/img/<paper>.png, in the order of PAPERS, each headed by a
    link to the paper's README section, and a line naming the papers without a figure. Two figures share a row;
    a strip more than WIDE times as wide as tall gets a row of its own, twice as wide. No figure is scaled up."""
    img = Path(root) / "docs" / "img"
    have = [p for p in PAPERS if (img / f"{p}.png").is_file()]
    rows, pair = [], []
    for p in have:
        w, h = Image.open(img / f"{p}.png").size
        wide = w > WIDE * h
        span = ' colspan="2"' if wide else ""
        cell = (f'<td align="center" valign="top"{span}><a href="#{p}">{TITLES[p]}</a>'
                f'<br><img src="docs/img/{p}.png" width="{min(w, FIGURE_WIDTH * (2 if wide else 1))}" '
                f'alt="{TITLES[p]} demo figure"></td>')
        if wide:
            rows.append([cell])
        else:
            pair.append(cell)
            if len(pair) == 2:
                rows.append(pair)
                pair = []
    rows += [pair] if pair else []
    lines = ["<table>", *("<tr>" + "".join(row) + "</tr>" for row in rows), "</table>"] if rows else []
    missing = [TITLES[p] for p in PAPERS if p not in have]
    if missing:
        lines += ["", f"No figure yet for: {', '.join(missing)} (`make demo-<paper>`, then `make readme`)."]
    return "\n".join(lines).strip("\n")


def write_source(root, name, block):
    """Write the tracked page of generated block `name` (docs/demos.md, docs/bench.md) around `block`."""
    begin, end = markers(name)
    page = DEMOS_PAGE if name == "demo-table" else BENCH_PAGE
    (Path(root) / SOURCES[name]).write_text(page.format(block=f"{begin}\n{block}\n{end}"))


def update_readme(root="."):
    """`make readme`: copy the demo table, the figures and the benchmark table from outputs/ into docs/ and
    README.md (see the module docstring). Returns 1 if `check` then finds a problem."""
    root = Path(root)
    readme_path = root / "README.md"
    readme = readme_path.read_text()
    demo_root, img = root / "outputs" / "demo", root / "docs" / "img"
    demos = [json.loads(p.read_text()) for p in sorted(demo_root.glob("*/demo.json"))]
    if demos:
        write_source(root, "demo-table", demo_block(demos))
        img.mkdir(parents=True, exist_ok=True)
        for paper in PAPERS:
            figure = find_figure(demo_root / paper, paper) if (demo_root / paper / "demo.json").is_file() else None
            target = img / f"{paper}.png"
            if figure is not None:
                target.write_bytes(figure.read_bytes())
                print(f"demo: {figure} -> {target}")
            elif target.exists():
                target.unlink()
                print(f"demo: removed {target} (no figure in {demo_root / paper})")
    else:
        print(f"demo: no demo.json below {demo_root}; the demo table and figures stay as they are")
        if not (root / SOURCES["demo-table"]).is_file():
            write_source(root, "demo-table", "No demo results yet (`make demo`, then `make readme`).")
    bench, bench_json = root / "outputs" / "bench" / "table.md", root / "outputs" / "bench" / "bench.json"
    quick = bench_json.is_file() and json.loads(bench_json.read_text()).get("quick")
    if bench.is_file() and not quick:
        write_source(root, "bench-table", bench.read_text().strip())
    else:
        print(f"demo: no full `make bench` table at {bench}; the benchmark table stays as it is")
        if not (root / SOURCES["bench-table"]).is_file():
            write_source(root, "bench-table", "No benchmark table yet (`make bench`, then `make readme`).")
    for name, source in SOURCES.items():
        readme = replace_block(readme, name, read_block((root / source).read_text(), name, source), readme_path)
    readme = replace_block(readme, "figures", figure_strip(root), readme_path)
    readme_path.write_text(readme)
    problems = check(root)
    for problem in problems:
        print(f"demo: {problem}", file=sys.stderr)
    return 1 if problems else 0


def heading_anchors(text):
    """GitHub's anchors of the markdown headings in `text` (lower case, punctuation dropped, spaces to hyphens)."""
    anchors = set()
    for line in text.splitlines():
        match = re.match(r"#{1,6} +(.*)", line)
        if match:
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def check(root="."):
    """What `make readme` keeps true, as a list of problems (empty: all well): each generated README block equals
    the file it is copied from, every docs/img figure the README names exists, every relative link resolves."""
    root = Path(root)
    readme = (root / "README.md").read_text()
    problems = []
    expected = {name: None for name in SOURCES}
    for name, source in SOURCES.items():
        if (root / source).is_file():
            expected[name] = read_block((root / source).read_text(), name, source)
    expected["figures"] = figure_strip(root)
    for name, block in expected.items():
        begin, _ = markers(name)
        if begin not in readme:
            problems.append(f"README.md has no generated block {name}")
        elif block is None:
            problems.append(f"README.md has block {name} but {SOURCES[name]} does not exist (run make readme)")
        elif read_block(readme, name) != block:
            source = SOURCES.get(name, "the PNGs under docs/img/")
            problems.append(f"README.md block {name} differs from {source}: run make readme, do not edit it by hand")
    for figure in sorted(set(re.findall(r"docs/img/[\w.-]+\.png", readme))):
        if not (root / figure).is_file():
            problems.append(f"README.md names {figure}, which does not exist")
    anchors = heading_anchors(readme)
    links = re.findall(r"\]\(([^)\s]+)\)", readme) + re.findall(r'(?:src|href)="([^"]+)"', readme)
    for link in sorted(set(links)):
        if re.match(r"[a-z]+:", link):  # http(s), mailto: not checked here
            continue
        path, _, anchor = link.partition("#")
        if not path and anchor not in anchors:
            problems.append(f"README.md links to #{anchor}, which is no heading of README.md")
        elif path and not (root / path).exists():
            problems.append(f"README.md links to {path}, which does not exist")
    return problems


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
    write.add_argument("--row_metric", nargs=2, action="append", default=[], metavar=("METHOD", "METRIC"),
                       help="the name of a row's own metric (default: --metric)")
    table = sub.add_parser("table", help="print the table of every demo.json below a folder")
    table.add_argument("root")
    table.add_argument("--out", help="also write the table (markdown) to this file")
    table.add_argument("--readme", help="also replace the demo table block of this markdown file")
    for name, text in (("readme", "copy tables and figures from outputs/ into docs/ and README.md"),
                       ("check", "list README blocks that differ from their sources, missing figures, broken links")):
        sub.add_parser(name, help=text).add_argument("--root", default=".", help="the repository (default: .)")
    args = parser.parse_args(argv)

    if args.command == "write":
        rows = {}
        for method, *files in args.row:
            if not files:
                raise SystemExit(f"demo: --row {method} names no eval.json")
            rows[method] = [read_metric(f, args.metric) for f in files]
        unknown = [method for method, _ in args.row_metric if method not in rows]
        if unknown:
            raise SystemExit(f"demo: --row_metric names no --row: {unknown}")
        demo = make_demo(args.paper, args.metric, rows, args.seconds, dict(args.row_metric), shell_cpu_seconds(),
                         os.getloadavg()[2])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.json").write_text(json.dumps(demo, indent=2) + "\n")
        print(format_table([demo]))
    elif args.command == "table":
        demos = [json.loads(p.read_text()) for p in sorted(Path(args.root).glob("*/demo.json"))]
        if not demos:
            raise SystemExit(f"demo: no demo.json below {args.root}")
        block = format_table(demos)
        print(block)
        if args.out:
            Path(args.out).write_text(block + "\n")
        if args.readme:
            readme = Path(args.readme)
            readme.write_text(replace_block(readme.read_text(), "demo-table", block, readme))
    elif args.command == "readme":
        return update_readme(args.root)
    else:
        problems = check(args.root)
        print("\n".join(problems) or "README.md: generated blocks, figures and links are in order")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
