# Shared by the domain-adaptation demos (adaptsegnet.sh, advent.sh, proda.sh; sourced after lib.sh, not run).
#
# The miniature GTA5 -> Cityscapes benchmark: one initial model (demos/uda_init.sh, `make demo-init`) that every
# row of the three demos starts from, and the report every DA demo ends with (the share of the source-only -> oracle
# gap each row closes, per seed, and one figure of predictions side by side).

INIT=${INIT:-outputs/demo/init}

# The fingerprint of a synthetic source set: SHA-256 over the names and bytes of its files, so a cached initial
# model is used only with the data it was trained on.
data_fingerprint() {
  "$PY" - "$1" <<'EOF'
import hashlib, sys
from pathlib import Path
digest = hashlib.sha256()
root = Path(sys.argv[1])
for path in sorted(p for p in root.rglob("*") if p.is_file()):
    digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
print(digest.hexdigest())
EOF
}

# require_init: stop with one clear message unless $INIT holds an initial model made from $DATA/gta5.
require_init() {
  local ckpt="$INIT/checkpoint.pth" stamp="$INIT/data.sha256"
  if [ ! -f "$ckpt" ] || [ ! -f "$stamp" ]; then
    echo "$ckpt: no initial model; make it first with \`make demo-init\` (DATA=$DATA INIT=$INIT)" >&2
    exit 1
  fi
  if [ "$(cat "$stamp")" != "$(data_fingerprint "$DATA/gta5")" ]; then
    echo "$ckpt: made from other data than $DATA/gta5 (its $stamp differs); remake it with \`make demo-init\`" >&2
    exit 1
  fi
}

# gap_report ROW_JSON...: after demo.json is written, print (and write to OUT/gap.md) each row's per-seed share of
# the source-only -> oracle gap, 100 (row - source-only) / (oracle - source-only), for that seed.
gap_report() {
  "$PY" - "$OUT/demo.json" "$OUT/gap.md" <<'EOF'
import json, sys
demo = json.load(open(sys.argv[1]))
rows = {r["method"]: r["values"] for r in demo["rows"]}
low, high = rows["source-only"], rows["oracle"]
lines = [f"| {demo['paper']} | {demo['metric']} per seed | mean | gap closed per seed (%) |", "|---|---|---|---|"]
for method, values in rows.items():
    shares = [100 * (v - a) / (b - a) if b != a else float("nan") for v, a, b in zip(values, low, high)]
    lines.append(f"| {method} | {' / '.join(f'{v:.1f}' for v in values)} | {sum(values) / len(values):.1f} | "
                 f"{' / '.join(f'{s:.0f}' for s in shares)} |")
text = "\n".join(lines) + "\n"
print(text, end="")
open(sys.argv[2], "w").write(text)
EOF
}

# figure OUT_PNG NAME=DIR:PANEL/PANELS ...: one row per validation image (the first three), one column per
# argument: panel PANEL (0-based) of the PANELS equal panels of DIR/<image>.png (the --viz figures of one run),
# headed NAME.
figure() {
  "$PY" - "$@" <<'EOF'
import sys
from pathlib import Path
from PIL import Image, ImageDraw
out, columns = sys.argv[1], []
for arg in sys.argv[2:]:
    name, spec = arg.split("=", 1)
    folder, panel = spec.rsplit(":", 1)
    index, count = (int(v) for v in panel.split("/"))
    columns.append((name, sorted(Path(folder).glob("*.png"))[:3], index, count))
cells = []
for name, files, index, count in columns:
    column = []
    for path in files:
        with Image.open(path) as im:
            w = im.width // count
            column.append(im.convert("RGB").crop((index * w, 0, (index + 1) * w, im.height)))
    cells.append(column)
w, h, title = cells[0][0].width, cells[0][0].height, 12
rows = min(len(c) for c in cells)
canvas = Image.new("RGB", (w * len(cells), title + h * rows), "white")
draw = ImageDraw.Draw(canvas)
for j, (column, (name, *_)) in enumerate(zip(cells, columns)):
    draw.text((j * w + 2, 0), name, fill="black")
    for i in range(rows):
        canvas.paste(column[i].resize((w, h)), (j * w, title + i * h))
canvas.save(out)
print(f"figure: {out}")
EOF
}
