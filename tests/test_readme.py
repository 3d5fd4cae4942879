"""README.md's generated blocks, figures and links (common/demo.py `check`, `readme`), and that `make demo` leaves
tracked files alone."""
import json
import re
import shutil
from pathlib import Path

from PIL import Image

from common import demo

ROOT = Path(__file__).resolve().parent.parent


def test_readme_blocks_equal_their_sources_figures_exist_links_resolve():
    problems = demo.check(ROOT)
    assert problems == [], "\n".join(problems)


def copy_of_repository(tmp_path):
    """README.md and docs/ copied, everything else at the top level linked, so links resolve as in the repository."""
    for entry in ROOT.iterdir():
        if entry.name not in ("README.md", "docs", ".git"):
            (tmp_path / entry.name).symlink_to(entry)
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    return tmp_path


def test_check_fails_on_a_changed_block_a_missing_figure_and_a_broken_link(tmp_path):
    root = copy_of_repository(tmp_path)
    assert demo.check(root) == []
    readme = (root / "README.md").read_text()
    for name in ("demo-table", "bench-table", "figures"):
        begin, _ = demo.markers(name)
        changed = readme.replace(begin + "\n", begin + "\n| edited by hand |\n", 1)
        (root / "README.md").write_text(changed)
        assert any(f"block {name} differs" in p for p in demo.check(root)), name
    (root / "README.md").write_text(readme + '\n<img src="docs/img/nowhere.png">\n[notes](docs/nowhere.md)\n'
                                    "[up](#no-such-heading)\n")
    problems = "\n".join(demo.check(root))
    assert "names docs/img/nowhere.png, which does not exist" in problems
    assert "links to docs/nowhere.md, which does not exist" in problems
    assert "links to #no-such-heading" in problems


def write_demo(folder, paper, value):
    folder.mkdir(parents=True)
    (folder / "demo.json").write_text(json.dumps(demo.make_demo(paper, "AP", {"untrained": [0.0, 0.0],
                                                                            paper: [value, value + 2]}, 75)))


def test_make_readme_copies_tables_and_figures_and_only_then_passes_check(tmp_path):
    (tmp_path / "README.md").write_text(
        "# Top\n\n" + "\n\n".join("\n".join(demo.markers(n)) for n in ("demo-table", "figures", "bench-table"))
        + "\n\n## DETR\n\n[the table](docs/demos.md), [speed](docs/bench.md), [up](#top)\n")
    write_demo(tmp_path / "outputs/demo/detr", "detr", 40.0)
    Image.new("RGB", (8, 4), (200, 10, 10)).save(tmp_path / "outputs/demo/detr/detr.png")
    write_demo(tmp_path / "outputs/demo/pvt", "pvt", 60.0)
    for name in ("a.png", "b.png"):  # two PNGs and no pvt.png: which one is the figure is not guessed
        Image.new("RGB", (4, 4)).save(tmp_path / "outputs/demo/pvt" / name)
    (tmp_path / "docs/img").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "docs/img/vistr.png")  # from an earlier run; no vistr demo now
    (tmp_path / "outputs/bench").mkdir(parents=True)
    (tmp_path / "outputs/bench/table.md").write_text("Device: cpu\n\n| paper | s / step |\n|---|---:|\n"
                                                     "| detr | 1.0 |\n")

    assert demo.update_readme(tmp_path) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "| detr | detr | AP | 41.0 (±1.0) | 40.0, 42.0 | 1m15s |" in readme
    assert "| pvt | untrained | AP | 0.0 (±0.0) | 0.0, 0.0 | 1m15s |" in readme
    assert "No demo.json for: vistr, trackformer, adaptsegnet, advent, proda" in readme
    assert (tmp_path / "docs/img/detr.png").read_bytes() == (tmp_path / "outputs/demo/detr/detr.png").read_bytes()
    assert not (tmp_path / "docs/img/pvt.png").exists() and not (tmp_path / "docs/img/vistr.png").exists()
    assert re.search(r'<a href="#detr">DETR</a><br><img src="docs/img/detr.png"', readme)
    assert "No figure yet for: PVT, VisTR" in readme
    assert "| detr | 1.0 |" in readme and "| detr | 1.0 |" in (tmp_path / "docs/bench.md").read_text()
    assert demo.check(tmp_path) == []

    # A `--quick` benchmark (the tests' tiny one) and an empty outputs/demo leave the tracked copies as they are.
    bench_page = (tmp_path / "docs/bench.md").read_text()
    (tmp_path / "outputs/bench/bench.json").write_text(json.dumps({"quick": True}))
    (tmp_path / "outputs/bench/table.md").write_text("| quick | 0.001 |\n")
    shutil.rmtree(tmp_path / "outputs/demo")
    assert demo.update_readme(tmp_path) == 0
    assert (tmp_path / "docs/bench.md").read_text() == bench_page
    assert (tmp_path / "README.md").read_text() == readme and (tmp_path / "docs/img/detr.png").exists()


def test_make_demo_writes_no_tracked_file():
    """The `demo` and `demo-<paper>` recipes write under outputs/ and data/ only (both ignored by git); copying into
    README.md and docs/ is `make readme`'s job."""
    makefile = (ROOT / "Makefile").read_text()
    recipes = re.findall(r"^((?:demo|\$\(addprefix demo-)[^:\n]*):[^\n]*\n((?:\t[^\n]*\n)+)", makefile, flags=re.M)
    assert {"demo", "$(addprefix demo-,$(PAPERS))"} <= {target for target, _ in recipes}
    for target, recipe in recipes:
        assert "README" not in recipe and "docs/" not in recipe and "readme" not in recipe, (target, recipe)
    assert {"outputs/", "data/"} <= set((ROOT / ".gitignore").read_text().split())


def test_every_command_in_the_readme_parses_with_its_scripts_parser():
    """The README's `python X.py ...` and `torchrun ... X.py ...` lines use only flags the script has ('...' and
    trailing comments dropped), so a renamed flag cannot leave the front page behind."""
    import importlib
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("python ", "torchrun ")) and ".py" in line:
                commands.append(shlex.split(line.replace("...", "")))
    assert len(commands) >= 14, commands
    for words in commands:
        script = next(w for w in words if w.endswith(".py"))
        args = words[words.index(script) + 1:]
        module = importlib.import_module(script[:-3])
        detect = script == "pvt.py" and "detect" in args
        parser = module.get_detect_args_parser() if detect else module.get_args_parser()
        try:
            parser.parse_args(args)
        except SystemExit:
            raise AssertionError(f"README command does not parse: {' '.join(words)}") from None
