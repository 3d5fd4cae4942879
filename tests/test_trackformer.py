"""TrackFormer: parity with the official code, matcher, track-query augmentation, tracker, MOT metrics, data, runs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trackformer as tf
from tests.fixtures.fill import fill_state_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "trackformer.pt"
TOL = dict(rtol=1e-4, atol=1e-4)


def assert_close(actual, expected, what):
    """torch.testing.assert_close at 1e-4, the message naming what differed."""
    try:
        torch.testing.assert_close(actual, expected, **TOL)
    except AssertionError as error:
        raise AssertionError(f"{what}: {error}") from None


# ---------------------------------------------------------------------------------------------------------------
# Parity with the official code (tests/fixtures/trackformer.pt)
# ---------------------------------------------------------------------------------------------------------------


def args_from_fixture(fx):
    """The parser's defaults, overridden by every model / loss setting the fixture's config holds."""
    args = tf.get_args_parser().parse_args([])
    config = fx["config"]["train_args"]
    for name in ("hidden_dim", "num_queries", "num_feature_levels", "enc_layers", "dec_layers", "dim_feedforward",
                 "nheads", "dec_n_points", "enc_n_points", "backbone", "aux_loss", "set_cost_class", "set_cost_bbox",
                 "set_cost_giou", "cls_loss_coef", "bbox_loss_coef", "giou_loss_coef", "focal_alpha", "focal_gamma",
                 "track_query_false_negative_prob", "track_query_false_positive_prob", "dropout"):
        setattr(args, name, config[name])
    assert config["multi_frame_attention"] and config["multi_frame_encoding"] and config["with_box_refine"]
    assert config["multi_frame_attention_separate_encoder"] and config["focal_loss"] and not config["two_stage"]
    args.num_classes = fx["config"]["class_logits"]
    return args


@pytest.fixture(scope="module")
def official():
    fx = torch.load(FIXTURE, weights_only=True)
    args = args_from_fixture(fx)
    model, criterion, matcher = tf.build_model(args)
    model.load_state_dict(fill_state_dict(fx["shapes"], fx["seed"]), strict=True)
    model.eval()
    inputs = fx["inputs"]
    with torch.no_grad():
        prev_out, prev_features = model(inputs["img_prev"])
        cur_out, _ = model(inputs["img_cur"], prev_features)
        target = dict(inputs["targets_cur"], **inputs["criterion_track_queries"])
        b_out, _ = model(inputs["img_cur"], prev_features, tf.stack_track_queries([target]))
    return dict(fx=fx, args=args, model=model, criterion=criterion, matcher=matcher, prev_out=prev_out,
                cur_out=cur_out, b_out=b_out, target=target)


def test_state_dict_matches_released_checkpoint_keys(official):
    shapes = official["fx"]["shapes"]
    state = official["model"].state_dict()
    assert len(shapes) == 597 and set(state) == set(shapes)
    assert all(list(state[k].shape) == list(shapes[k][0]) for k in shapes)
    assert any(k.startswith("transformer.decoder.bbox_embed.") for k in state)  # the duplicated registration


def test_parity_block_a_two_frames(official):
    expected = official["fx"]["outputs"]
    for ours, name in ((official["prev_out"], "frame_prev"), (official["cur_out"], "frame_cur")):
        for key in ("pred_logits", "pred_boxes", "hs_embed"):
            assert_close(ours[key], expected[name][key], f"{name}.{key}")
    assert len(expected["track_queries"]["track_query_hs_embeds"]) == 0  # filled weights keep no detection


def test_parity_block_b_track_queries_outputs_indices_losses(official):
    expected = official["fx"]["outputs"]["criterion_frame_cur"]
    out, target = official["b_out"], official["target"]
    num_track = len(target["track_query_hs_embeds"])
    assert out["pred_logits"].shape[1] == num_track + official["args"].num_queries
    for key in ("pred_logits", "pred_boxes", "hs_embed"):
        assert_close(out[key], expected[key], key)
    assert len(out["aux_outputs"]) == len(expected["aux_outputs"])
    for i, (ours, theirs) in enumerate(zip(out["aux_outputs"], expected["aux_outputs"])):
        for key in ("pred_logits", "pred_boxes"):
            assert_close(ours[key], theirs[key], f"aux_outputs[{i}].{key}")
    last = {k: v for k, v in out.items() if k != "aux_outputs"}
    for (src, tgt), (esrc, etgt) in zip(official["matcher"](last, [target]), expected["indices"]):
        assert src.tolist() == esrc.tolist() and tgt.tolist() == etgt.tolist()
    prev = {k: v for k, v in official["prev_out"].items() if k != "aux_outputs"}
    prev_target = official["fx"]["inputs"]["targets_prev"]
    for (src, tgt), (esrc, etgt) in zip(official["matcher"](prev, [prev_target]), expected["prev_indices"]):
        assert src.tolist() == esrc.tolist() and tgt.tolist() == etgt.tolist()
    losses = official["criterion"](out, [target])
    assert set(losses) == set(expected["losses"])
    for key, value in expected["losses"].items():
        assert_close(losses[key].float(), value.float(), key)
    assert official["criterion"].weight_dict == {k: float(v) for k, v in expected["weight_dict"].items()}
    total = sum(losses[k] * w for k, w in official["criterion"].weight_dict.items())
    assert_close(total, expected["loss_total_weighted"], "weighted total loss")


def test_track_query_augmentation_reproduces_official_draws(official):
    """With the fixture's seed, add_track_queries draws the same FN subset and FP outputs as the official code."""
    fx = official["fx"]
    prev = {k: v for k, v in official["prev_out"].items() if k != "aux_outputs"}
    target = dict(fx["inputs"]["targets_cur"], prev_target=fx["inputs"]["targets_prev"])
    prev_indices = [tuple(ind) for ind in fx["outputs"]["criterion_frame_cur"]["prev_indices"]]
    torch.manual_seed(fx["inputs"]["aug_seed"])
    tf.add_track_queries([target], prev_indices, prev, official["args"].num_queries,
                         official["args"].track_query_false_negative_prob,
                         official["args"].track_query_false_positive_prob)
    for key, value in fx["inputs"]["criterion_track_queries"].items():
        assert target[key].shape == value.shape, key
        assert_close(target[key].float(), value.float(), key)


# ---------------------------------------------------------------------------------------------------------------
# Matcher and deformable attention against brute force
# ---------------------------------------------------------------------------------------------------------------


def test_matcher_forces_track_queries_and_solves_the_rest_optimally():
    torch.manual_seed(0)
    matcher = tf.TrackHungarianMatcher()
    logits, boxes = torch.randn(1, 6, 3), torch.rand(1, 6, 4) * 0.5 + 0.25
    target = {"labels": torch.tensor([0, 1, 0]), "boxes": torch.rand(3, 4) * 0.5 + 0.25,
              "track_queries_mask": torch.tensor([True, True, False, False, False, False]),
              "track_queries_fal_pos_mask": torch.tensor([False, True, False, False, False, False]),
              "track_query_match_ids": torch.tensor([2])}
    (src, tgt), = matcher({"pred_logits": logits, "pred_boxes": boxes}, [target])
    pairs = dict(zip(src.tolist(), tgt.tolist()))
    assert pairs[0] == 2 and 1 not in pairs and src.tolist() == sorted(src.tolist())
    cost = matcher.cost_matrix({"pred_logits": logits, "pred_boxes": boxes}, [target])[0]
    best = min((cost[a, 0] + cost[b, 1], (a, b)) for a in range(2, 6) for b in range(2, 6) if a != b)[1]
    assert (pairs.get(best[0]), pairs.get(best[1])) == (0, 1)


def test_ms_deform_attn_core_matches_bilinear_by_hand():
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(1, sum(h * w for h, w in shapes), 2, 3)  # [N, S, M, D]
    loc = torch.rand(1, 5, 2, 2, 3, 2)  # [N, Lq, M, L, P, 2]
    weights = torch.rand(1, 5, 2, 2, 3)
    out = tf.ms_deform_attn_core(value, shapes, loc, weights).view(1, 5, 2, 3)
    expected = torch.zeros(5, 2, 3)
    starts = [0, 12]
    for q in range(5):
        for m in range(2):
            for lvl, (h, w) in enumerate(shapes):
                grid = value[0, starts[lvl]:starts[lvl] + h * w, m].view(h, w, 3)
                for p in range(3):
                    x, y = loc[0, q, m, lvl, p, 0] * w - 0.5, loc[0, q, m, lvl, p, 1] * h - 0.5
                    x0, y0 = math.floor(x), math.floor(y)
                    acc = torch.zeros(3)
                    for dy in (0, 1):
                        for dx in (0, 1):
                            xi, yi = x0 + dx, y0 + dy
                            if 0 <= xi < w and 0 <= yi < h:
                                acc += grid[yi, xi] * (1 - abs(x - xi)) * (1 - abs(y - yi))
                    expected[q, m] += weights[0, q, m, lvl, p] * acc
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Tracker bookkeeping on hand-made model outputs
# ---------------------------------------------------------------------------------------------------------------


class ScriptedDetector:
    """Returns, frame by frame, the given (track-query, object-query) outputs; records the track queries it got."""

    def __init__(self, frames, dim=4):
        self.frames, self.dim, self.calls = frames, dim, []

    def __call__(self, image, prev_features, track_queries):
        num_track = 0 if track_queries is None else track_queries["hs_embeds"].shape[1]
        self.calls.append(track_queries)
        rows = self.frames[len(self.calls) - 1]
        assert len(rows) == num_track + 3, f"frame {len(self.calls) - 1}: expected {len(rows) - 3} track queries"
        logits = torch.full((1, len(rows), 2), -9.0)
        boxes = torch.zeros(1, len(rows), 4)
        for i, (score, box) in enumerate(rows):
            logits[0, i, 0] = float(np.log(score / (1 - score)))
            x0, y0, x1, y1 = box
            boxes[0, i] = torch.tensor([(x0 + x1) / 200, (y0 + y1) / 200, (x1 - x0) / 100, (y1 - y0) / 100])
        embeds = torch.arange(len(rows) * self.dim, dtype=torch.float32).view(1, len(rows), self.dim)
        embeds = embeds + 100 * len(self.calls)
        return {"pred_logits": logits, "pred_boxes": boxes, "hs_embed": embeds}, None


LOW = (0.1, (0, 0, 10, 10))


def run_tracker(frames, **kwargs):
    detector = ScriptedDetector(frames)
    tracker = tf.Tracker(detector, num_object_queries=3, **kwargs)
    for _ in frames:
        tracker.step(torch.zeros(1, 3, 8, 8), torch.tensor([[100, 100]]))
    return tracker, detector


def test_tracker_births_continuation_and_detection_nms():
    frames = [
        [(0.9, (10, 10, 30, 50)), (0.8, (60, 10, 80, 50)), LOW],  # two births
        [(0.95, (12, 10, 32, 50)), (0.3, (60, 10, 80, 50)),  # track 0 continues, track 1 is lost
         (0.9, (12, 10, 32, 50.5)), (0.7, (40, 60, 60, 90)), LOW],  # a duplicate of track 0 and a birth
    ]
    tracker, detector = run_tracker(frames)
    assert detector.calls[0] is None
    queries = detector.calls[1]
    torch.testing.assert_close(queries["boxes"][0], torch.tensor([[0.2, 0.3, 0.2, 0.4], [0.7, 0.3, 0.2, 0.4]]))
    assert queries["hs_embeds"][0, 0, 0] == 100 and queries["hs_embeds"][0, 1, 0] == 104  # their frame-0 outputs
    # new ids 2 (the duplicate) and 3; NMS 0.9 against the existing track removes the duplicate
    assert {t.id for t in tracker.tracks} == {0, 3}
    assert [t.id for t in tracker.inactive_tracks] == [1]
    assert set(tracker.results) == {0, 1, 3} and set(tracker.results[1]) == {0}
    np.testing.assert_allclose(tracker.results[0][1]["bbox"], [12, 10, 32, 50], atol=1e-4)
    assert tracker.results[3][1]["obj_ind"] == 1


def test_tracker_reidentifies_inactive_track_and_track_nms():
    frames = [
        [(0.9, (10, 10, 30, 50)), (0.8, (60, 10, 80, 50)), LOW],
        [(0.95, (12, 10, 32, 50)), (0.3, (60, 10, 80, 50)), LOW, LOW, (0.6, (40, 60, 60, 90))],
        # queries: active 0, active 2, inactive 1; track 2 jumps onto track 0 (lower score): track NMS removes it;
        # inactive track 1 scores again: re-identified with its new box
        [(0.95, (14, 10, 34, 50)), (0.5, (14, 10, 34, 50.2)), (0.8, (62, 12, 82, 52)), LOW, LOW, LOW],
    ]
    tracker, detector = run_tracker(frames)
    assert detector.calls[2]["hs_embeds"].shape[1] == 3
    assert {t.id for t in tracker.tracks} == {0, 1} and not tracker.inactive_tracks
    assert tracker.num_reids == 1 and set(tracker.results[1]) == {0, 2}
    np.testing.assert_allclose(tracker.results[1][2]["bbox"], [62, 12, 82, 52], atol=1e-4)
    assert set(tracker.results[2]) == {1}


def test_tracker_drops_inactive_tracks_after_patience():
    frames = [[(0.9, (10, 10, 30, 50)), LOW, LOW]] + [[LOW, LOW, LOW, LOW]] * 3 + [[LOW, LOW, LOW]]
    tracker, detector = run_tracker(frames, inactive_patience=2)
    assert [0 if c is None else c["hs_embeds"].shape[1] for c in detector.calls] == [0, 1, 1, 1, 0]
    assert not tracker.tracks and not tracker.inactive_tracks
    # an inactive track is queried with its last kept box
    torch.testing.assert_close(detector.calls[3]["boxes"][0, 0], torch.tensor([0.2, 0.3, 0.2, 0.4]))


def test_tracker_public_detections_keep_only_covered_births():
    detector = ScriptedDetector([[(0.9, (10, 10, 30, 50)), (0.8, (60, 10, 80, 50)), LOW]])
    tracker = tf.Tracker(detector, num_object_queries=3, public_detections="min_iou_0_5")
    tracker.step(torch.zeros(1, 3, 8, 8), torch.tensor([[100, 100]]), torch.tensor([[61.0, 11.0, 81.0, 51.0]]))
    assert [(t.id, int(t.obj_ind)) for t in tracker.tracks] == [(0, 1)]  # only the box a public detection covers


# ---------------------------------------------------------------------------------------------------------------
# MOT metrics on a toy sequence worked by hand
# ---------------------------------------------------------------------------------------------------------------


def test_mot_metrics_toy_sequence_by_hand():
    gt = {1: {1: (0, 0, 10, 10), 2: (20, 0, 10, 10)}, 2: {1: (1, 0, 10, 10), 2: (21, 0, 10, 10)},
          3: {1: (2, 0, 10, 10)}, 4: {1: (3, 0, 10, 10), 2: (23, 0, 10, 10)}, 5: {1: (4, 0, 10, 10)}}
    hyp = {1: {"a": (0, 0, 10, 10), "b": (20, 0, 10, 10)},
           2: {"a": (21, 0, 10, 10), "b": (1, 0, 10, 10)},  # the two hypotheses swap objects: 2 switches
           3: {"b": (2, 0, 10, 10), "c": (50, 50, 10, 10)},  # c: false positive
           4: {"b": (3, 0, 10, 10)},  # object 2 missed
           5: {"b": (5, 0, 10, 10), "d": (4, 0, 10, 10)}}  # b keeps object 1 (IoU 0.82); d is a false positive
    counts = tf.mot_counts(gt, {f: {ord(k): v for k, v in h.items()} for f, h in hyp.items()})
    assert (counts["num_objects"], counts["FN"], counts["FP"], counts["IDSW"]) == (8, 1, 2, 2)
    assert (counts["MT"], counts["ML"]) == (1, 0)  # object 1 tracked 5/5, object 2 2/3
    assert (counts["IDTP"], counts["IDFN"], counts["IDFP"]) == (5, 3, 4)  # 1<->b (4 frames), 2<->a (1 frame)
    summary = tf.mot_summary([counts])
    assert summary["MOTA"] == pytest.approx(100 * (1 - 5 / 8))
    assert summary["IDF1"] == pytest.approx(100 * 10 / 17)


# ---------------------------------------------------------------------------------------------------------------
# Data: tiny MOT17-layout sequences, bad input
# ---------------------------------------------------------------------------------------------------------------


def write_sequence(root, name, length=10, size=(80, 64), seed=0):
    """A MOTChallenge sequence of `length` frames: two coloured boxes moving right on a grey background."""
    rng = np.random.default_rng(seed)
    seq = root / "train" / name
    (seq / "img1").mkdir(parents=True)
    (seq / "gt").mkdir()
    (seq / "det").mkdir()
    w, h = size
    (seq / "seqinfo.ini").write_text(f"[Sequence]\nname={name}\nimDir=img1\nframeRate=30\nseqLength={length}\n"
                                     f"imWidth={w}\nimHeight={h}\nimExt=.jpg\n")
    objects = [(1, 4, 8, 14, 28, (220, 40, 40)), (2, 40, 24, 16, 30, (40, 200, 60))]
    gt, det = [], []
    for frame in range(1, length + 1):
        img = np.full((h, w, 3), 110, np.uint8) + rng.integers(0, 10, (h, w, 3), dtype=np.uint8)
        for tid, x, y, bw, bh, colour in objects:
            x = x + 2 * (frame - 1)
            img[y:y + bh, x:x + bw] = colour
            gt.append(f"{frame},{tid},{x + 1},{y + 1},{bw},{bh},1,1,1.0")
            det.append(f"{frame},-1,{x + 1},{y + 1},{bw},{bh},0.9,-1,-1,-1")
        gt.append(f"{frame},9,1,1,5,5,0,7,0.5")  # an ignored static person
        Image.fromarray(img).save(seq / "img1" / f"{frame:06d}.jpg", quality=95)
    (seq / "gt" / "gt.txt").write_text("\n".join(gt) + "\n")
    (seq / "det" / "det.txt").write_text("\n".join(det) + "\n")
    return seq


@pytest.fixture(scope="module")
def mot_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mot17")
    write_sequence(root, "MOT17-01-FRCNN", seed=1)
    write_sequence(root, "MOT17-02-FRCNN", seed=2)
    return root


def test_mot17_reading_split_and_frame_pairs(mot_root):
    seqs = tf.find_sequences(mot_root)
    assert [s.name for s in seqs] == ["MOT17-01-FRCNN", "MOT17-02-FRCNN"]
    assert seqs[0].frames([0.0, 0.5]) == [1, 2, 3, 4, 5] and seqs[0].frames([0.5, 1.0]) == [6, 7, 8, 9, 10]
    boxes, ids = seqs[0].train_target(3)
    assert ids.tolist() == [1, 2]  # the conf-0 static person is ignored
    torch.testing.assert_close(boxes[0], torch.tensor([8.0, 8.0, 22.0, 36.0]))  # (left - 1, top - 1, + w, + h)
    assert set(seqs[0].eval_boxes(3)) == {1, 2} and seqs[0].dets[3][0][:2] == [8.0, 8.0]
    dataset = tf.FramePairs(seqs, [0.0, 0.5], 5, max_size=96)
    img, target = dataset[0]
    assert img.shape[0] == 3 and target["prev_image"].shape == img.shape
    assert target["boxes"].shape == (2, 4) and target["prev_target"]["track_ids"].tolist() == [1, 2]


def test_bad_input_is_reported(tmp_path, capsys):
    seq = write_sequence(tmp_path, "MOT17-03-FRCNN", length=4)
    with (seq / "gt" / "gt.txt").open("a") as f:
        f.write("9,1,1,1,5,5,1,1,1.0\n3,5,1,1,0,5,1,1,1.0\n")  # frame past the sequence; zero width
    loaded = tf.MOTSequence(seq)
    assert "dropped 1 rows outside frames 1..4 and 1 boxes of zero size" in capsys.readouterr().out
    assert 9 not in loaded.gt and 5 not in loaded.gt[3][:, 1]
    (seq / "img1" / "000002.jpg").unlink()
    with pytest.raises(SystemExit, match="000002.jpg: frame 2 of sequence MOT17-03-FRCNN is missing"):
        tf.FramePairs([loaded], [0.0, 1.0], 5, 96)[1]
    (seq / "seqinfo.ini").unlink()
    with pytest.raises(SystemExit, match="missing seqinfo.ini"):
        tf.find_sequences(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Training: overfit one batch; the script as a user runs it
# ---------------------------------------------------------------------------------------------------------------

TINY = ["--backbone", "convstem", "--hidden_dim", "96", "--dim_feedforward", "128", "--enc_layers", "1",
        "--dec_layers", "2", "--num_queries", "10", "--nheads", "4", "--img_max_size", "96", "--val_width", "64",
        "--device", "cpu", "--num_workers", "0"]


def test_overfit_one_batch(mot_root):
    torch.manual_seed(0)
    args = tf.get_args_parser().parse_args(TINY + ["--lr", "1e-3", "--dropout", "0", "--lr_backbone", "1e-3"])
    model, criterion, matcher = tf.build_model(args)
    seq = tf.find_sequences(mot_root)[0]
    images, targets = [], []
    for frame in (3, 4):
        boxes, ids = seq.train_target(frame)
        img, target = tf.to_input(seq.image(frame), boxes, ids)
        images.append(img)
        targets.append(target)
    batch = [dict(targets[1], prev_image=images[0], prev_target=targets[0])]
    optimizer = torch.optim.AdamW(tf.param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)
    losses = []
    for _ in range(40):
        target = [{k: v for k, v in batch[0].items() if not k.startswith("track_quer")}]
        out = tf.two_frame_forward(model, matcher, [images[1]], target, args)
        loss_dict = criterion(out, target)
        loss = sum(loss_dict[k] * w for k, w in criterion.weight_dict.items())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, f"loss fell only from {losses[0]:.2f} to {losses[-1]:.2f}"


def test_script_trains_then_evaluates_from_checkpoint(mot_root, tmp_path):
    out = tmp_path / "run"
    common = [sys.executable, str(ROOT / "trackformer.py"), "--data_root", str(mot_root), "--output_dir", str(out)]
    train = subprocess.run(common + TINY + ["--epochs", "1", "--max_iters", "3", "--batch_size", "2", "--viz"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (out / "checkpoint.pth").is_file() and (out / "tracks" / "MOT17-01-FRCNN.txt").is_file()
    assert (out / "viz" / "MOT17-02-FRCNN" / "000006.png").is_file()
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert "train_loss" in log[0] and "eval" in log[-1]
    evaluate = subprocess.run(common + TINY + ["--eval", "--resume", str(out / "checkpoint.pth")],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert {"MOTA", "IDF1", "MT", "ML", "FP", "FN", "IDSW"} <= set(result)
    assert result["num_objects"] == 20  # 2 sequences x 5 held-out frames x 2 pedestrians
