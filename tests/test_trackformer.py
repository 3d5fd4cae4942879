"""TrackFormer: parity with the official code, matcher, track-query augmentation, tracker, MOT metrics, data, runs."""
import json
import math
import os
import random
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


def take_config(args, config, names):
    """`args` with the official config's values of `names`, and its false-negative probability as our switch."""
    for name in names:
        setattr(args, name, config[name])
    args.track_query_false_negatives = config["track_query_false_negative_prob"] > 0  # official: a switch
    return args


def filled_model(fx, args):
    """(model in eval mode, criterion, matcher) built from `args`, with the fixture's filled weights loaded strictly."""
    model, criterion, matcher = tf.build_model(args)
    model.load_state_dict(fill_state_dict(fx["shapes"], fx["seed"]), strict=True)
    return model.eval(), criterion, matcher


def args_from_fixture(fx):
    """The parser's defaults, overridden by every model / loss setting the fixture's config holds."""
    config = fx["config"]["train_args"]
    args = take_config(tf.get_args_parser().parse_args([]), config, (
        "hidden_dim", "num_queries", "num_feature_levels", "enc_layers", "dec_layers", "dim_feedforward", "nheads",
        "dec_n_points", "enc_n_points", "backbone", "aux_loss", "set_cost_class", "set_cost_bbox", "set_cost_giou",
        "cls_loss_coef", "bbox_loss_coef", "giou_loss_coef", "focal_alpha", "focal_gamma",
        "track_query_false_positive_prob", "dropout", "overflow_boxes"))
    assert config["multi_frame_attention"] and config["multi_frame_encoding"] and config["with_box_refine"]
    assert config["multi_frame_attention_separate_encoder"] and config["focal_loss"] and not config["two_stage"]
    args.num_classes = fx["config"]["class_logits"]
    return args


@pytest.fixture(scope="module")
def official():
    fx = torch.load(FIXTURE, weights_only=True)
    args = args_from_fixture(fx)
    model, criterion, matcher = filled_model(fx, args)
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
                         official["args"].track_query_false_negatives,
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



def test_tracker_public_detections_center_distance():
    """A public detection keeps the new detection with the nearest centre, if that squared distance is below the
    detection's area; each detection is used once."""
    frames = [[(0.9, (10, 10, 30, 50)), (0.8, (12, 12, 32, 52)), (0.7, (60, 10, 80, 50))]]
    public = torch.tensor([[11.0, 11.0, 31.0, 51.0], [11.0, 11.0, 31.0, 51.0], [90.0, 60.0, 99.0, 99.0]])
    detector = ScriptedDetector(frames)
    tracker = tf.Tracker(detector, num_object_queries=3, public_detections="center_distance")
    tracker.step(torch.zeros(1, 3, 8, 8), torch.tensor([[100, 100]]), public)
    # both near detections start tracks (one public box each); the far one is not near any public box
    assert sorted(int(t.obj_ind) for t in tracker.tracks) == [0, 1]


def test_tracker_greedy_reid_and_reid_sim_only():
    frames = [
        [(0.9, (10, 10, 30, 50)), LOW, LOW],
        [(0.1, (10, 10, 30, 50)), LOW, LOW, LOW],  # the track is lost: inactive
        [(0.1, (10, 10, 30, 50)), (0.9, (13, 10, 33, 50)), LOW, LOW],  # a detection near it re-identifies it
    ]
    tracker, _ = run_tracker(frames, reid_greedy_matching=True)
    assert [t.id for t in tracker.tracks] == [0] and tracker.num_reids == 1 and tracker.track_num == 1
    np.testing.assert_allclose(tracker.results[0][2]["bbox"], [13, 10, 33, 50], atol=1e-4)
    tracker, detector = run_tracker([[(0.9, (10, 10, 30, 50)), LOW, LOW], [(0.9, (11, 10, 31, 50)), LOW, LOW, LOW]],
                                    reid_sim_only=True)
    # with reid_sim_only every track is inactive after its frame, but is still queried (and re-activated)
    assert detector.calls[1]["hs_embeds"].shape[1] == 1 and not tracker.tracks
    assert [t.id for t in tracker.inactive_tracks] == [0] and set(tracker.results[0]) == {0, 1}


def test_interpolate_tracks_fills_gaps_linearly():
    results = {0: {0: {"bbox": np.array([0, 0, 10, 10.0]), "score": 0.9, "obj_ind": 1},
                   3: {"bbox": np.array([6, 3, 16, 13.0]), "score": 0.8, "obj_ind": 1}},
               1: {5: {"bbox": np.array([1, 1, 2, 2.0]), "score": 0.5, "obj_ind": 2}}}
    filled = tf.interpolate_tracks(results)
    assert sorted(filled[0]) == [0, 1, 2, 3] and sorted(filled[1]) == [5]
    np.testing.assert_allclose(filled[0][2]["bbox"], [4, 2, 14, 12])


# ---------------------------------------------------------------------------------------------------------------
# The MOTChallenge protocol: our evaluation against TrackEval and py-motmetrics on the same files
# ---------------------------------------------------------------------------------------------------------------

# A hand-made 10-frame sequence: pedestrian 1 (tracked by hypothesis 1 except frames 5-7: a fragment), pedestrian 2
# (hypothesis 2, then hypothesis 5 from frame 6: an identity switch), pedestrian 3 at visibility 0.1 (still a target
# in MOT17: hypothesis 3 from frame 2), a static person (class 7, flag 0) covered by hypothesis 4 (removed, not a
# false positive), an unmatched false positive (hypothesis 6, frames 7-8) and loose boxes (IoU about 0.7).
def hand_made_gt():
    rows = []
    for f in range(1, 11):
        rows.append((f, 1, 10 + 2 * f, 20, 20, 40, 1, 1, 1.0))
        rows.append((f, 2, 70 + f, 22, 22, 44, 1, 1, 0.8))
        rows.append((f, 3, 120, 60, 20, 40, 1, 1, 0.1))
        rows.append((f, 4, 150, 10, 20, 40, 0, 7, 1.0))
    return rows


def hand_made_results():
    rows = []
    for f in range(1, 11):
        if f not in (5, 6, 7):
            rows.append((f, 1, 10 + 2 * f + 1, 21, 20, 40))
        rows.append((f, 2 if f < 6 else 5, 70 + f + (3 if f % 2 else 0), 22, 22, 44))
        if f >= 2:
            rows.append((f, 3, 122, 62, 20, 40))
        rows.append((f, 4, 151, 10, 20, 40))
        if f in (7, 8):
            rows.append((f, 6, 5, 100, 20, 20))
    return rows


def write_mot(path, rows, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(fmt.format(*r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    seq = root / "train" / "MOT17-90-FRCNN"
    (seq / "img1").mkdir(parents=True)
    (seq / "seqinfo.ini").write_text("[Sequence]\nname=MOT17-90-FRCNN\nimDir=img1\nframeRate=30\nseqLength=10\n"
                                     "imWidth=200\nimHeight=120\nimExt=.jpg\n")
    write_mot(seq / "gt" / "gt.txt", hand_made_gt(), "{},{},{},{},{},{},{},{},{}")
    write_mot(root / "res" / "MOT17-90-FRCNN.txt", hand_made_results(), "{},{},{},{},{},{},1,-1,-1,-1")
    return root


def trackeval_on_files(gt_root, res_dir, seq_name):
    """TrackEval as scripts/run_mot_challenge.py runs it on the MOTChallenge folder layout (BENCHMARK MOT17)."""
    import contextlib
    import io
    import shutil

    import trackeval
    work = Path(res_dir).parent / "trackeval"
    shutil.rmtree(work, ignore_errors=True)
    (work / "gt" / "MOT17-train").mkdir(parents=True)
    shutil.copytree(gt_root / "train" / seq_name, work / "gt" / "MOT17-train" / seq_name)
    (work / "gt" / "seqmaps").mkdir()
    (work / "gt" / "seqmaps" / "MOT17-train.txt").write_text(f"name\n{seq_name}\n")
    (work / "trackers" / "MOT17-train" / "mine" / "data").mkdir(parents=True)
    shutil.copy(Path(res_dir) / f"{seq_name}.txt", work / "trackers" / "MOT17-train" / "mine" / "data")
    dataset = trackeval.datasets.MotChallenge2DBox({"GT_FOLDER": str(work / "gt"),
                                                   "TRACKERS_FOLDER": str(work / "trackers"),
                                                   "BENCHMARK": "MOT17", "SPLIT_TO_EVAL": "train",
                                                   "PRINT_CONFIG": False})
    evaluator = trackeval.Evaluator({"OUTPUT_SUMMARY": False, "OUTPUT_DETAILED": False, "PLOT_CURVES": False,
                                     "LOG_ON_ERROR": None, "PRINT_CONFIG": False})
    with contextlib.redirect_stdout(io.StringIO()):
        out, _ = evaluator.evaluate([dataset], [trackeval.metrics.HOTA(), trackeval.metrics.CLEAR(),
                                                trackeval.metrics.Identity()])
    return out["MotChallenge2DBox"]["mine"]["COMBINED_SEQ"]["pedestrian"]


def motmetrics_on_files(seq_dir, res_file, frames, monkeypatch):
    """py-motmetrics with its MOT16/17 preprocessing (distractor-matched hypotheses removed), on the given frames.

    motmetrics 1.4.0 (the latest release) calls np.asfarray, removed in NumPy 2.0, in its IoU matrix: it is given
    back here for the call, as np.asarray(x, float)."""
    import motmetrics as mm
    monkeypatch.setattr(np, "asfarray", lambda a, dtype=np.float64: np.asarray(a, dtype=dtype), raising=False)
    gt = mm.io.loadtxt(str(seq_dir / "gt" / "gt.txt"), fmt="mot16")
    res = mm.io.loadtxt(str(res_file), fmt="mot15-2D")
    keep = list(frames)
    gt = gt[gt.index.get_level_values(0).isin(keep)]
    res = res[res.index.get_level_values(0).isin(keep)]
    acc, _ = mm.utils.CLEAR_MOT_M(gt, res, str(seq_dir / "seqinfo.ini"), "iou", distth=0.5)
    metrics = ["mota", "motp", "idf1", "num_false_positives", "num_misses", "num_switches", "mostly_tracked",
               "mostly_lost", "num_objects", "num_unique_objects"]
    return mm.metrics.create().compute(acc, metrics=metrics, name="seq").iloc[0]


def test_evaluation_matches_trackeval_and_motmetrics(hand_made, monkeypatch):
    seqs = tf.find_sequences(hand_made)
    ours = tf.mot_challenge_metrics(seqs, hand_made / "res", [list(range(1, 11))])
    # the events worked by hand: 3 misses for the fragment + 1 before hypothesis 3 starts, 2 false positives,
    # 1 switch; the static person's hypothesis is neither a match nor a false positive
    assert (ours["num_objects"], ours["FN"], ours["FP"], ours["IDSW"], ours["Frag"]) == (30, 4, 2, 1, 1)
    assert ours["MOTA"] == pytest.approx(100 * (1 - 7 / 30))
    assert (ours["MT"], ours["ML"], ours["num_unique_objects"]) == (2, 0, 3)
    te = trackeval_on_files(hand_made, hand_made / "res", "MOT17-90-FRCNN")
    mm = motmetrics_on_files(hand_made / "train" / "MOT17-90-FRCNN", hand_made / "res" / "MOT17-90-FRCNN.txt",
                             range(1, 11), monkeypatch)
    assert ours["MOTA"] == 100 * te["CLEAR"]["MOTA"] == pytest.approx(100 * mm["mota"], abs=1e-12)
    assert ours["IDF1"] == 100 * te["Identity"]["IDF1"] == pytest.approx(100 * mm["idf1"], abs=1e-12)
    assert ours["MOTP"] == 100 * te["CLEAR"]["MOTP"] == pytest.approx(100 * (1 - mm["motp"]), abs=1e-12)
    assert ours["HOTA"] == 100 * te["HOTA"]["HOTA"].mean() and ours["AssA"] == 100 * te["HOTA"]["AssA"].mean()
    assert ours["DetA"] == 100 * te["HOTA"]["DetA"].mean()
    assert (ours["FP"], ours["FN"], ours["IDSW"], ours["MT"], ours["ML"]) == (
        mm["num_false_positives"], mm["num_misses"], mm["num_switches"], mm["mostly_tracked"], mm["mostly_lost"])
    assert ours["num_objects"] == mm["num_objects"] and ours["num_unique_objects"] == mm["num_unique_objects"]


def test_evaluation_of_a_frame_range_matches_motmetrics(hand_made, monkeypatch):
    """The cross-validation split scores only the held-out frames (cut from both files and renumbered)."""
    seqs = tf.find_sequences(hand_made)
    ours = tf.mot_challenge_metrics(seqs, hand_made / "res", [list(range(6, 11))])
    mm = motmetrics_on_files(hand_made / "train" / "MOT17-90-FRCNN", hand_made / "res" / "MOT17-90-FRCNN.txt",
                             range(6, 11), monkeypatch)
    assert ours["num_objects"] == mm["num_objects"] == 15
    assert ours["MOTA"] == pytest.approx(100 * mm["mota"], abs=1e-12)
    assert ours["IDF1"] == pytest.approx(100 * mm["idf1"], abs=1e-12)
    assert (ours["FP"], ours["FN"], ours["IDSW"]) == (mm["num_false_positives"], mm["num_misses"],
                                                      mm["num_switches"])


def test_submission_files_have_the_motchallenge_format(tmp_path):
    results = {0: {0: {"bbox": np.array([9.0, 19.0, 29.0, 59.5]), "score": 0.91234, "obj_ind": 3}},
               4: {1: {"bbox": np.array([0.0, 0.0, 10.0, 20.0]), "score": 0.5, "obj_ind": 7}}}
    tf.write_results(results, tmp_path / "MOT17-01-DPM.txt", frames=[11, 12])
    assert (tmp_path / "MOT17-01-DPM.txt").read_text().splitlines() == [
        "11,1,10.00,20.00,20.00,40.50,0.9123,-1,-1,-1", "12,5,1.00,1.00,10.00,20.00,0.5000,-1,-1,-1"]


# ---------------------------------------------------------------------------------------------------------------
# Data: MOTChallenge layout (train and test, detector copies), the official training pipeline, bad input
# ---------------------------------------------------------------------------------------------------------------


def write_sequence(root, name, length=10, size=(80, 64), seed=0, split="train", gt=True):
    """A MOTChallenge sequence of `length` frames: two coloured boxes moving right on a grey background, a third
    one at visibility 0.2 (not a training target) and a conf-0 static person."""
    rng = np.random.default_rng(seed)
    seq = root / split / name
    (seq / "img1").mkdir(parents=True)
    (seq / "det").mkdir()
    w, h = size
    (seq / "seqinfo.ini").write_text(f"[Sequence]\nname={name}\nimDir=img1\nframeRate=30\nseqLength={length}\n"
                                     f"imWidth={w}\nimHeight={h}\nimExt=.jpg\n")
    objects = [(1, 4, 8, 14, 28, (220, 40, 40), 1.0), (2, 40, 24, 16, 30, (40, 200, 60), 0.9),
               (3, 60, 30, 10, 20, (40, 40, 220), 0.2)]
    rows, det = [], []
    for frame in range(1, length + 1):
        img = np.full((h, w, 3), 110, np.uint8) + rng.integers(0, 10, (h, w, 3), dtype=np.uint8)
        for tid, x, y, bw, bh, colour, vis in objects:
            x = x + 2 * (frame - 1)
            img[y:y + bh, x:x + bw] = colour
            rows.append(f"{frame},{tid},{x + 1},{y + 1},{bw},{bh},1,1,{vis}")
            det.append(f"{frame},-1,{x + 1},{y + 1},{bw},{bh},0.9,-1,-1,-1")
        rows.append(f"{frame},9,1,1,5,5,0,7,0.5")  # an ignored static person
        Image.fromarray(img).save(seq / "img1" / f"{frame:06d}.jpg", quality=95)
    if gt:
        (seq / "gt").mkdir()
        (seq / "gt" / "gt.txt").write_text("\n".join(rows) + "\n")
    (seq / "det" / "det.txt").write_text("\n".join(det) + "\n")
    return seq


@pytest.fixture(scope="module")
def mot_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mot17")
    write_sequence(root, "MOT17-01-FRCNN", seed=1)
    write_sequence(root, "MOT17-02-FRCNN", seed=2)
    write_sequence(root, "MOT17-02-SDP", seed=2)
    for dets in tf.DETECTORS:
        write_sequence(root, f"MOT17-03-{dets}", length=6, seed=3, split="test", gt=False)
    return root


def test_mot17_reading_split_detectors_and_training_targets(mot_root):
    seqs = tf.find_sequences(mot_root)
    assert [s.name for s in seqs] == ["MOT17-01-FRCNN", "MOT17-02-FRCNN"]  # FRCNN copies only
    assert [s.name for s in tf.find_sequences(mot_root, "train", tf.DETECTORS)][-1] == "MOT17-02-SDP"
    test = tf.find_sequences(mot_root, "test", ("DPM", "SDP"))
    assert [s.name for s in test] == ["MOT17-03-DPM", "MOT17-03-SDP"] and not test[0].has_gt
    assert seqs[0].frames([0.0, 0.5]) == [1, 2, 3, 4, 5] and seqs[0].frames([0.5, 1.0]) == [6, 7, 8, 9, 10]
    target = seqs[0].train_target(3)
    assert target["track_ids"].tolist() == [1, 2, 3]  # the conf-0 static person is not a pedestrian
    assert target["ignore"].tolist() == [False, False, True]  # visibility 0.2 <= 0.25
    torch.testing.assert_close(target["boxes"][0], torch.tensor([8.0, 8.0, 22.0, 36.0]))  # (left - 1, top - 1, ...)
    assert seqs[0].dets[3][0][:2] == [8.0, 8.0]
    img, out = tf.to_input(seqs[0].image(3), target)
    assert out["track_ids"].tolist() == [1, 2] and len(out["boxes"]) == 2  # the low-visibility box is removed


def test_crop_keeps_partly_visible_boxes_whole_with_overflow_boxes():
    img = Image.new("RGB", (100, 80))
    target = {"boxes": torch.tensor([[-10.0, 5, 20, 40], [50, 10, 70, 30], [90, 60, 95, 70], [30, -5, 40, 90]]),
              "track_ids": torch.arange(4), "ignore": torch.zeros(4, dtype=torch.bool)}
    steps = [("crop", (10, 10, 60, 50))]  # x0, y0, w, h
    _, kept = tf.apply_transform(img, target, steps, overflow_boxes=True)
    torch.testing.assert_close(kept["boxes"], torch.tensor([[-20.0, -5, 10, 30], [40, 0, 60, 20], [20, -15, 30, 80]]))
    assert kept["track_ids"].tolist() == [0, 1, 3]  # the box wholly outside the crop collapses and is removed
    _, clipped = tf.apply_transform(img, target, steps, overflow_boxes=False)
    torch.testing.assert_close(clipped["boxes"], torch.tensor([[0.0, 0, 10, 30], [40, 0, 60, 20], [20, 0, 30, 50]]))


def test_previous_frame_jitter_is_a_crop_of_80_to_100_percent_resized_back():
    rng = random.Random(0)
    img = Image.fromarray(np.arange(100 * 80 * 3, dtype=np.uint8).reshape(80, 100, 3))
    target = {"boxes": torch.tensor([[10.0, 10, 50, 70]]), "track_ids": torch.tensor([7]),
              "ignore": torch.zeros(1, dtype=torch.bool)}
    widths = []
    for _ in range(200):
        steps = tf.prev_frame_jitter(100, 80, 0.2, rng)
        (name, (x0, y0, cw, ch)), resize = steps
        assert name == "crop_clip" and resize == ("resize", (100, 80)) and ch == int(80 * cw / 100)
        assert 0 <= x0 <= 100 - cw and 0 <= y0 <= 80 - ch
        widths.append(cw)
        out_img, out = tf.apply_transform(img, target, steps)
        assert out_img.size == (100, 80) and out["track_ids"].tolist() == [7]
    assert min(widths) >= 80 and max(widths) == 100 and len(set(widths)) > 10
    assert tf.prev_frame_jitter(100, 80, 0.0, rng) == []


def test_frame_pairs_share_the_transform_and_jitter_only_the_previous_frame(mot_root, monkeypatch):
    seq = tf.find_sequences(mot_root)[0]
    calls, draws = [], []
    jitter, params = tf.prev_frame_jitter, tf.transform_params
    monkeypatch.setattr(tf, "prev_frame_jitter", lambda *a: calls.append(a[2]) or jitter(*a))
    monkeypatch.setattr(tf, "transform_params", lambda *a: draws.append(1) or params(*a))
    dataset = tf.FramePairs([seq], [0.0, 1.0], 0, max_size=96, rnd_augs=0.01)  # previous frame = same frame
    random.seed(0)
    for _ in range(10):
        img, target = dataset[4]
        assert target["prev_image"].shape == img.shape
        # same frame and transform, a crop of >= 99 % (1 px here) resized back (boxes clipped to the frame): boxes
        # move by at most about 2 % of the frame
        inside = (target["boxes"][:, :2] - target["boxes"][:, 2:] / 2 >= 0).all(1)
        inside &= (target["boxes"][:, :2] + target["boxes"][:, 2:] / 2 <= 1).all(1)
        torch.testing.assert_close(target["prev_target"]["boxes"][inside], target["boxes"][inside], atol=0.025,
                                   rtol=0)
    assert calls == [0.01] * 10 and len(draws) == 10  # one transform draw per pair, one jitter (previous frame)
    assert target["prev_target"]["track_ids"].tolist() == target["track_ids"].tolist() == [1, 2]


def write_crowdhuman(root):
    (root / "Images").mkdir(parents=True)
    for name in ("a", "b"):
        Image.new("RGB", (60, 40), (90, 90, 90)).save(root / "Images" / f"{name}.jpg")
    rows = [{"ID": "a", "gtboxes": [{"tag": "person", "fbox": [5, 5, 10, 20], "extra": {}},
                                    {"tag": "person", "fbox": [30, 5, 10, 20], "extra": {"ignore": 1}},
                                    {"tag": "mask", "fbox": [0, 0, 60, 40], "extra": {"ignore": 1}}]},
            {"ID": "b", "gtboxes": [{"tag": "person", "fbox": [40, 10, 8, 16], "extra": {"ignore": 0}}]}]
    (root / "annotation_train.odgt").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_crowdhuman_ignore_boxes_are_not_persons_and_mot_crowdhuman_concatenates(mot_root, tmp_path):
    root = write_crowdhuman(tmp_path / "CrowdHuman")
    items = tf.read_crowdhuman(root, "train")
    assert [(p.name, len(b), i.tolist(), m) for p, b, i, m in items] == [("a.jpg", 2, [False, True], None),
                                                                         ("b.jpg", 1, [False], None)]
    torch.testing.assert_close(items[0][1][0], torch.tensor([5.0, 5, 15, 25]))
    (root / "annotations").mkdir()  # the same boxes as the official COCO conversion writes them
    (root / "train").mkdir()
    Image.new("RGB", (60, 40)).save(root / "train" / "a.jpg")
    coco = {"images": [{"id": 0, "file_name": "a.jpg"}], "annotations": [
        {"image_id": 0, "bbox": [5, 5, 10, 20], "iscrowd": 0, "ignore": 0},
        {"image_id": 0, "bbox": [30, 5, 10, 20], "iscrowd": 0, "ignore": 1},
        {"image_id": 0, "bbox": [0, 0, 9, 9], "iscrowd": 1}]}
    (root / "annotations" / "train.json").write_text(json.dumps(coco))
    assert [(len(b), i.tolist()) for _, b, i, _ in tf.read_crowdhuman(root, "train")] == [(2, [False, True])]
    args = tf.get_args_parser().parse_args(["--dataset", "mot_crowdhuman", "--data_root", str(mot_root),
                                            "--crowdhuman_path", str(root), "--crowdhuman_train_split", "train",
                                            "--img_max_size", "96"])
    dataset = tf.build_train_dataset(args)
    assert len(dataset) == 2 * 5 + 1  # two MOT sequences' first halves + one CrowdHuman image
    img, target = dataset[len(dataset) - 1]
    assert len(target["boxes"]) == 1 and target["prev_image"].shape == img.shape  # the ignore box is gone
    with pytest.raises(SystemExit, match="annotation_val.odgt"):
        tf.read_crowdhuman(tmp_path, "train_val")


def test_false_negative_flag_is_an_on_off_switch():
    assert tf.get_args_parser().parse_args([]).track_query_false_negatives
    assert not tf.get_args_parser().parse_args(["--no_track_query_false_negatives"]).track_query_false_negatives
    prev_out = {"pred_boxes": torch.rand(1, 6, 4), "hs_embed": torch.randn(1, 6, 8)}
    target = {"boxes": torch.rand(3, 4), "track_ids": torch.tensor([1, 2, 3]),
              "prev_target": {"track_ids": torch.tensor([1, 2, 3])}}
    tf.add_track_queries([target], [(torch.tensor([0, 2, 4]), torch.tensor([0, 1, 2]))], prev_out, 6, False, 0.0)
    assert target["track_query_match_ids"].tolist() == [0, 1, 2]  # without false negatives every object is kept


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
    (seq / "det" / "det.txt").write_text("1,-1,x,2,3,4,0.5\n")
    with pytest.raises(SystemExit, match="det.txt: expected comma-separated numbers"):
        tf.MOTSequence(seq)
    (seq / "seqinfo.ini").unlink()
    with pytest.raises(SystemExit, match="missing seqinfo.ini"):
        tf.find_sequences(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Training: overfit one batch; the script as a user runs it
# ---------------------------------------------------------------------------------------------------------------

TINY = ["--backbone", "convstem", "--hidden_dim", "96", "--dim_feedforward", "128", "--enc_layers", "1",
        "--dec_layers", "2", "--num_queries", "10", "--nheads", "4", "--img_max_size", "96", "--val_width", "64",
        "--device", "cpu", "--num_workers", "0"]


def test_overfit_one_batch(mot_root, one_thread):
    torch.manual_seed(0)
    args = tf.get_args_parser().parse_args(TINY + ["--lr", "1e-3", "--dropout", "0", "--lr_backbone", "1e-3"])
    model, criterion, matcher = tf.build_model(args)
    seq = tf.find_sequences(mot_root)[0]
    images, targets = [], []
    for frame in (3, 4):
        img, target = tf.to_input(seq.image(frame), seq.train_target(frame))
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


@pytest.mark.parametrize("enc_layers", ["0", "1"])
def test_every_trainable_tensor_gets_a_gradient(mot_root, one_thread, enc_layers):
    """DistributedDataParallel (torchrun) stops at the second step when a trainable tensor takes no part in the
    loss: so the model must have none, also without an encoder (whose positions alone read the level embeddings)."""
    torch.manual_seed(0)
    args = tf.get_args_parser().parse_args(TINY + ["--enc_layers", enc_layers, "--dropout", "0"])
    model, criterion, matcher = tf.build_model(args)
    seq = tf.find_sequences(mot_root)[0]
    (prev, prev_target), (img, target) = (tf.to_input(seq.image(f), seq.train_target(f)) for f in (3, 4))
    targets = [dict(target, prev_image=prev, prev_target=prev_target)]
    loss_dict = criterion(tf.two_frame_forward(model, matcher, [img], targets, args), targets)
    sum(loss_dict[k] * w for k, w in criterion.weight_dict.items()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"trainable tensors without a gradient: {unused}"


def test_script_trains_then_tracks_the_test_split_from_its_checkpoint(mot_root, tmp_path):
    out = tmp_path / "run"
    common = [sys.executable, str(ROOT / "trackformer.py"), "--data_root", str(mot_root)] + TINY
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train = subprocess.run(common + ["--output_dir", str(out), "--epochs", "3", "--lr_drop", "1", "--max_iters", "3",
                                     "--batch_size", "2", "--viz"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (out / "checkpoint.pth").is_file() and (out / "tracks" / "MOT17-01-FRCNN.txt").is_file()
    assert (out / "viz" / "MOT17-02-FRCNN" / "000006.png").is_file() and (out / "viz" / "MOT17-02-FRCNN.png").is_file()
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert "train_loss" in log[0] and "eval" in log[-1]
    # the lr drops tenfold once, after --lr_drop epochs (the official MultiStepLR), not again every --lr_drop epochs
    assert [entry["train_lr"] for entry in log[:3]] == pytest.approx([2e-4, 2e-5, 2e-5], rel=1e-9)
    result = json.loads((out / "eval.json").read_text())
    assert {"MOTA", "IDF1", "MOTP", "HOTA", "DetA", "AssA", "MT", "ML", "FP", "FN", "IDSW"} <= set(result)
    assert result["num_objects"] == 30  # 2 sequences x 5 held-out frames x 3 pedestrians (visibility 0.2 included)
    submit = tmp_path / "submit"  # a submission: every detector copy of the test split, public detections
    test = subprocess.run(common + ["--output_dir", str(submit), "--eval", "--resume", str(out / "checkpoint.pth"),
                                    "--split", "test", "--dets", "ALL", "--public_detections", "min_iou_0_5",
                                    "--interpolate"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert test.returncode == 0, test.stderr[-3000:]
    assert sorted(p.name for p in (submit / "tracks").iterdir()) == [f"MOT17-03-{d}.txt" for d in tf.DETECTORS]
    assert "MOTA" not in json.loads((submit / "eval.json").read_text())  # no gt.txt on the test split


# ---------------------------------------------------------------------------------------------------------------
# MOTS20: masks read and written in the KITTI-MOTS format, sMOTSA / MOTSA / IDF1 on a hand-made case, the model
# with DETR's segmentation head, the synthetic MOTS20 set
# ---------------------------------------------------------------------------------------------------------------


def box_mask(rows, cols, shape=(10, 20)):
    mask = np.zeros(shape, bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def rle_row(frame, track_id, cls, mask):
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return f"{frame} {track_id} {cls} {mask.shape[0]} {mask.shape[1]} {rle['counts'].decode()}"


@pytest.fixture
def mots_case(tmp_path):
    """Pedestrian A (2001) tracked exactly by track 0 in frames 1-3; pedestrian B (2002) covered at IoU 0.75 by
    track 1 (frame 1), then track 2 (frame 2: an identity switch), missed in frame 3; track 3 inside the ignore
    region (frame 2: removed); track 4 a false positive (frame 3)."""
    seq = tmp_path / "train" / "MOTS20-90"
    (seq / "gt").mkdir(parents=True)
    (seq / "img1").mkdir()
    (seq / "seqinfo.ini").write_text("[Sequence]\nname=MOTS20-90\nimDir=img1\nframeRate=30\nseqLength=3\n"
                                     "imWidth=20\nimHeight=10\nimExt=.jpg\n")
    a, b, ignore = box_mask((2, 8), (2, 6)), box_mask((2, 8), (10, 14)), box_mask((0, 10), (16, 20))
    rows = [rle_row(f, i, c, m) for f in (1, 2, 3) for i, c, m in ((2001, 2, a), (2002, 2, b), (10000, 10, ignore))]
    (seq / "gt" / "gt.txt").write_text("\n".join(rows) + "\n")
    b_part = box_mask((2, 8), (10, 13))
    results = {0: {i: {"mask": a} for i in range(3)}, 1: {0: {"mask": b_part}}, 2: {1: {"mask": b_part}},
               3: {1: {"mask": box_mask((3, 6), (17, 19))}}, 4: {2: {"mask": box_mask((0, 2), (0, 6))}}}
    tf.write_mots_results(results, tmp_path / "res" / "MOTS20-90.txt", [1, 2, 3], 10, 20)
    return tmp_path


def test_mots_files_round_trip_and_metrics_by_hand(mots_case):
    seq = tf.find_sequences(mots_case)[0]
    assert sorted(seq.masks) == [(f, i) for f in (1, 2, 3) for i in (2001, 2002)]  # the ignore region is no target
    target = seq.train_target(2)
    assert target["track_ids"].tolist() == [2001, 2002] and target["masks"].shape == (2, 10, 20)
    torch.testing.assert_close(target["boxes"][0], torch.tensor([2.0, 2, 6, 8]))  # the mask's box, 0-based
    written = tf.read_mots(mots_case / "res" / "MOTS20-90.txt")
    assert [(f, i, c) for f, i, c, _ in written] == [(1, 1, 2), (1, 2, 2), (2, 1, 2), (2, 3, 2), (2, 4, 2), (3, 1, 2),
                                                     (3, 5, 2)]
    from pycocotools import mask as mask_utils
    assert mask_utils.decode(written[1][3]).sum() == 18
    result = tf.mot_challenge_metrics([seq], mots_case / "res", [[1, 2, 3]], benchmark="MOTS")
    # 5 matches (IoU 1, 1, 1, 0.75, 0.75), 1 miss, 1 false positive, 1 switch over 6 gt masks
    assert (result["num_objects"], result["FN"], result["FP"], result["IDSW"]) == (6, 1, 1, 1)
    assert result["MOTSA"] == pytest.approx(100 * (5 - 1 - 1) / 6)
    assert result["sMOTSA"] == pytest.approx(100 * (4.5 - 1 - 1) / 6)
    assert result["IDF1"] == pytest.approx(100 * 2 * 4 / (2 * 4 + 2 + 2))  # IDTP 4 (A-0: 3, B-1: 1)
    assert result["MOTSP"] == pytest.approx(100 * 4.5 / 5)
    cut = tf.mot_challenge_metrics([seq], mots_case / "res", [[2, 3]], benchmark="MOTS")  # frames 2-3 only
    assert (cut["num_objects"], cut["FN"], cut["FP"], cut["IDSW"]) == (4, 1, 1, 0)


def test_tracker_masks_do_not_overlap():
    frames = [[(0.9, (10, 10, 30, 50)), (0.8, (20, 10, 40, 50)), LOW]]
    detector = ScriptedDetector(frames)

    def with_masks(image, prev_features, track_queries):
        out, features = detector(image, prev_features, track_queries)
        logits = torch.full((1, 3, 25, 25), -5.0)
        logits[0, 0, 2:12, 2:8] = 3.0  # query 0 claims a region, query 1 an overlapping one with more confidence
        logits[0, 1, 2:12, 5:10] = 4.0
        return dict(out, pred_masks=logits), features

    tracker = tf.Tracker(with_masks, num_object_queries=3)
    tracker.step(torch.zeros(1, 3, 50, 50), torch.tensor([[100, 100]]))
    m0, m1 = tracker.results[0][0]["mask"], tracker.results[1][0]["mask"]
    assert m0.shape == (100, 100) and m0.any() and m1.any() and not (m0 & m1).any()
    assert m1[30, 25] and not m0[30, 25]  # the overlap goes to the more confident query


def step_losses_and_gradients(model, criterion, matcher, images, targets, args):
    """The training's two-frame step (`two_frame_forward`, criterion, backward): its losses and every gradient."""
    model.zero_grad()
    torch.manual_seed(0)  # the same track-query augmentation draws
    targets = [dict(t) for t in targets]
    out = tf.two_frame_forward(model, matcher, images, targets, args)
    losses = criterion(out, targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("masks", [False, True])
def test_current_pass_reuses_the_previous_frame_encoding_with_the_same_losses_and_gradients(mot_root, masks,
                                                                                           one_thread, monkeypatch):
    torch.manual_seed(0)
    extra = ["--masks", "--hidden_dim", "384", "--nheads", "8"] if masks else []
    args = tf.get_args_parser().parse_args(TINY + extra + ["--dropout", "0"])
    model, criterion, matcher = tf.build_model(args)
    model.train()
    seq = tf.find_sequences(mot_root)[0]
    encoder_calls = []
    model.transformer.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    batches = []
    for same_padding in (True, False):  # reused; padded otherwise (one batch size, other masks): encoded again
        images, targets = [], []
        for k, frame in enumerate((3, 6)):
            img, target = tf.to_input(seq.image(frame + 1), seq.train_target(frame + 1))
            prev_img, prev_target = tf.to_input(seq.image(frame), seq.train_target(frame))
            if not same_padding:  # the first sample's previous frame and the second's current frame shorter
                small = torch.nn.functional.interpolate((prev_img, img)[k][None], size=(48, img.shape[-1]))[0]
                prev_img, img = (small, img) if k == 0 else (prev_img, small)
            if masks:
                target["masks"] = torch.zeros(len(target["boxes"]), *img.shape[-2:], dtype=torch.bool)
                prev_target["masks"] = torch.zeros(len(prev_target["boxes"]), *prev_img.shape[-2:], dtype=torch.bool)
            images.append(img)
            targets.append(dict(target, prev_image=prev_img, prev_target=prev_target))
        batches.append((images, targets))
        del encoder_calls[:]
        reused = step_losses_and_gradients(model, criterion, matcher, images, targets, args)
        assert len(encoder_calls) == (3 if same_padding else 4)  # previous pass 2, current pass 1 or 2
        with monkeypatch.context() as m:  # plain features: the current pass encodes the previous frame again
            m.setattr(tf, "EncodedFrame", lambda features, encoded: features)
            del encoder_calls[:]
            again = step_losses_and_gradients(model, criterion, matcher, images, targets, args)
            assert len(encoder_calls) == 4
        assert set(reused[0]) == set(again[0]) and all(torch.equal(reused[0][k], again[0][k]) for k in again[0])
        for name, grad in again[1].items():
            assert torch.equal(reused[1][name], grad), name
    model.transformer.dropout = 0.1  # with dropout the current pass draws its own masks, as the official code
    del encoder_calls[:]
    step_losses_and_gradients(model, criterion, matcher, *batches[0], args)
    assert len(encoder_calls) == 4


def test_masks_model_outputs_and_losses(one_thread):
    torch.manual_seed(0)
    args = tf.get_args_parser().parse_args(TINY + ["--masks", "--hidden_dim", "384", "--nheads", "8"])
    model, criterion, matcher = tf.build_model(args)
    assert {"bbox_attention.q_linear.weight", "mask_head.lay1.weight", "mask_head.adapter3.weight"} <= set(
        model.state_dict())
    images = torch.randn(1, 3, 64, 80)
    out, features = model(images)
    assert out["pred_masks"].shape == (1, 10, *features[0][0].shape[-2:])  # first backbone map
    target = {"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.5]]), "labels": torch.tensor([0]),
              "track_ids": torch.tensor([1]), "masks": torch.from_numpy(box_mask((10, 40), (20, 36), (64, 80)))[None]}
    losses = criterion(out, [target])
    assert {"loss_mask", "loss_dice"} <= set(losses) and "loss_mask_0" not in losses
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    assert model.mask_head.out_lay.weight.grad.abs().sum() > 0
    with pytest.raises(SystemExit, match="multiples of 8"):
        tf.build_model(tf.get_args_parser().parse_args(TINY + ["--masks"]))  # hidden 96: GroupNorm(8) widths


def test_synthetic_mots20_masks_are_the_mot17_pedestrians(tmp_path):
    import common.synthetic as syn
    syn.write(tmp_path, only=["mot17", "mots20"], images=20, size=(96, 80))
    mot, mots = tf.find_sequences(tmp_path / "mot17")[0], tf.find_sequences(tmp_path / "mots20")[0]
    assert mots.name == "MOTS20-02" and mot.name == "MOT17-02-FRCNN" and mots.length == mot.length == 10
    objects = tf.read_mots(mots.path / "gt" / "gt.txt")
    assert {c for _, _, c, _ in objects} == {2, 10} and all(i == 2000 + i % 1000 for _, i, c, _ in objects if c == 2)
    from pycocotools import mask as mask_utils
    for frame in range(1, 11):
        rows = [o for o in objects if o[0] == frame]
        masks = mask_utils.decode([rle for *_, rle in rows]).astype(bool)
        assert masks.sum(-1).max() <= 1  # visible pixels: no two objects share one
        boxes = {int(r[1]): r[2:6] for r in mot.gt[frame] if r[7] == 1}
        for (_, track_id, cls, _), k in zip(rows, range(len(rows))):
            if cls == 2:  # a pedestrian's mask lies in its MOT17 box (swinging arms may reach 5 % past it)
                x0, y0, x1, y1 = boxes[track_id - 2000]
                ys, xs = np.nonzero(masks[..., k])
                slack = 0.05 * (y1 - y0) + 1
                assert xs.min() >= x0 - slack and xs.max() <= x1 + slack
                assert ys.min() >= y0 - slack and ys.max() <= y1 + slack
        assert np.array_equal(np.asarray(mot.image(frame)), np.asarray(mots.image(frame)))


def test_script_trains_and_tracks_mots20_with_masks(tmp_path):
    import common.synthetic as syn
    syn.write(tmp_path, only=["mots20"], images=10, size=(96, 80))  # 2 sequences of 5 frames
    common = [sys.executable, str(ROOT / "trackformer.py"), "--data_root", str(tmp_path / "mots20"), "--masks"]
    small = TINY + ["--hidden_dim", "384", "--nheads", "8", "--num_queries", "4", "--dec_layers", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    run = subprocess.run(common + small + ["--output_dir", str(out), "--epochs", "1", "--max_iters", "2", "--viz",
                                           "--detection_obj_score_thresh", "0.3"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert {"sMOTSA", "MOTSA", "MOTSP", "IDF1", "HOTA"} <= set(result) and result["num_objects"] > 0
    tf.read_mots(out / "tracks" / "MOTS20-02.txt")  # the result file is valid KITTI-MOTS
    no_masks = subprocess.run(common + small + ["--dataset", "mot_crowdhuman", "--crowdhuman_path", str(tmp_path)],
                              capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert no_masks.returncode != 0 and "CrowdHuman has no masks" in no_masks.stderr


def write_coco_person(root):
    """Two 80x64 images: a polygon person, an uncompressed-RLE person marked `ignore`, a crowd (dropped); a
    compressed-RLE person on the second image."""
    from pycocotools import mask as mask_utils
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (80, 64), (90, 90, 90)).save(root / "train2017" / name)
    uncompressed = {"size": [64, 80], "counts": rle_counts(box_mask((5, 15), (50, 60), (64, 80)))}
    compressed = mask_utils.encode(np.asfortranarray(box_mask((30, 60), (0, 10), (64, 80)).astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()
    anns = [{"id": 1, "image_id": 1, "bbox": [20, 10, 20, 20], "iscrowd": 0, "category_id": 1,
             "segmentation": [[20, 10, 40, 10, 40, 30, 20, 30]]},
            {"id": 2, "image_id": 1, "bbox": [50, 5, 10, 10], "iscrowd": 0, "category_id": 1, "ignore": 1,
             "segmentation": uncompressed},
            {"id": 3, "image_id": 1, "bbox": [0, 0, 80, 64], "iscrowd": 1, "category_id": 1,
             "segmentation": {"size": [64, 80], "counts": [0, 64 * 80]}},
            {"id": 4, "image_id": 2, "bbox": [0, 30, 10, 30], "iscrowd": 0, "category_id": 1,
             "segmentation": compressed}]
    images = [{"id": 1, "file_name": "a.jpg", "height": 64, "width": 80},
              {"id": 2, "file_name": "b.jpg", "height": 64, "width": 80},
              {"id": 3, "file_name": "none.jpg", "height": 64, "width": 80}]  # no annotation: not used
    (root / "annotations" / "person_keypoints_train2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}))


def rle_counts(mask):
    """COCO's uncompressed RLE of a bool mask: run lengths in column-major order, starting with a run of zeros."""
    counts, current, run = [], False, 0
    for v in mask.T.reshape(-1):
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    return counts + [run]


def test_coco_person_masks_data_freeze_detr_and_mask_head_loading(tmp_path, one_thread):
    write_coco_person(tmp_path / "coco")
    items = tf.read_coco_person(tmp_path / "coco")
    assert [(p.name, len(b), i.tolist()) for p, b, i, _ in items] == [("a.jpg", 2, [False, True]),
                                                                       ("b.jpg", 1, [False])]
    masks = tf.decode_segmentations(items[0][3])
    assert masks.shape == (2, 64, 80) and masks.dtype == torch.bool
    # the polygon's pixels (pycocotools rasterises the square's outline inclusively at its far edges)
    assert masks[0][10:30, 20:40].all() and masks[0].sum() <= 21 * 21
    assert torch.equal(masks[1], torch.from_numpy(box_mask((5, 15), (50, 60), (64, 80))))
    assert torch.equal(tf.decode_segmentations(items[1][3])[0], torch.from_numpy(box_mask((30, 60), (0, 10), (64, 80))))
    args = tf.get_args_parser().parse_args(TINY + ["--masks", "--hidden_dim", "384", "--nheads", "8", "--dataset",
                                                   "coco_person", "--coco_path", str(tmp_path / "coco")])
    img, target = tf.build_train_dataset(args)[0]
    assert target["masks"].shape == (1, *img.shape[-2:])  # the ignore person is gone, its mask too
    assert target["prev_target"]["masks"].shape[-2:] == target["prev_image"].shape[-2:]
    with pytest.raises(SystemExit, match="person_keypoints_train2017.json"):
        tf.read_coco_person(tmp_path)

    # --freeze_detr: only bbox_attention and the mask head train; the conv stem keeps its batch-norm statistics
    args.freeze_detr = True
    model, _, _ = tf.build_model(args)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"bbox_attention", "mask_head"}
    model.train()
    assert not model.backbone[0].body.layer1[1].training and model.mask_head.training

    # --load_mask_head_from_model: the tensors whose shapes fit, the rest keep their initialisation
    other, _, _ = tf.build_model(args)
    state = {k: v + 1 for k, v in other.state_dict().items() if k.startswith(("bbox_attention.", "mask_head."))}
    state["mask_head.lay1.weight"] = torch.zeros(3, 3)  # another width: not loaded
    torch.save({"model": state}, tmp_path / "segm.pth")
    before = model.state_dict()["mask_head.lay1.weight"].clone()
    loaded = tf.load_mask_head(model, tmp_path / "segm.pth")
    assert "mask_head.lay1.weight" not in loaded and len(loaded) == len(state) - 1
    assert torch.equal(model.state_dict()["mask_head.lay1.weight"], before)
    assert torch.equal(model.state_dict()["bbox_attention.q_linear.weight"], state["bbox_attention.q_linear.weight"])
    torch.save({"model": {"mask_head.lay1.weight": torch.zeros(3, 3)}}, tmp_path / "nothing.pth")
    with pytest.raises(SystemExit, match="none of its"):
        tf.load_mask_head(model, tmp_path / "nothing.pth")


def test_script_trains_the_mask_head_on_coco_persons_from_a_box_model(tmp_path):
    """train_coco_person_masks: a box model (--pretrained, no mask head) + DETR's mask head, only the head trains."""
    write_coco_person(tmp_path / "coco")
    small = TINY + ["--hidden_dim", "384", "--nheads", "8", "--num_queries", "4", "--dec_layers", "1"]
    box, _, _ = tf.build_model(tf.get_args_parser().parse_args(small))
    torch.save({"model": box.state_dict()}, tmp_path / "box.pth")
    segm, _, _ = tf.build_model(tf.get_args_parser().parse_args(small + ["--masks"]))
    torch.save({"model": {k: v for k, v in segm.state_dict().items() if k.startswith(("bbox_attention.", "mask_"))}},
               tmp_path / "segm.pth")
    run = subprocess.run([sys.executable, str(ROOT / "trackformer.py"), *small, "--masks", "--freeze_detr",
                          "--dataset", "coco_person", "--coco_path", str(tmp_path / "coco"), "--pretrained",
                          str(tmp_path / "box.pth"), "--load_mask_head_from_model", str(tmp_path / "segm.pth"),
                          "--no_tracking_eval", "--epochs", "1", "--batch_size", "1", "--lr", "1e-3",
                          "--output_dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mask-head tensors start fresh" in run.stdout and "mask head: " in run.stdout
    trained = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)["model"]
    for k, v in box.state_dict().items():  # the box model, batch-norm statistics included, is unchanged
        assert torch.equal(trained[k], v), k
    head = [k for k in trained if k.startswith("mask_head.") and k.endswith("weight")]
    assert any(not torch.equal(trained[k], segm.state_dict()[k]) for k in head)  # the head trained


# ---------------------------------------------------------------------------------------------------------------
# The vanilla-DETR TrackFormer with masks (--no-deformable --masks): parity with the official DETRSegmTracking
# (tests/fixtures/trackformer_mots.pt), the tracker on it, a training run
# ---------------------------------------------------------------------------------------------------------------

MOTS_FIXTURE = ROOT / "tests" / "fixtures" / "trackformer_mots.pt"


def mots_args_from_fixture(fx):
    """--no-deformable --masks, with every model / loss setting the fixture's official config holds."""
    config = fx["config"]["train_args"]
    assert not config["deformable"] and config["masks"] and config["tracking"] and not config["focal_loss"]
    assert config["track_query_false_positive_eos_weight"] and not config["pre_norm"] and not config["track_attention"]
    assert config["position_embedding"] == "sine" and not config["multi_frame_attention"]
    args = take_config(tf.get_args_parser().parse_args(["--no-deformable", "--masks"]), config, (
        "hidden_dim", "num_queries", "enc_layers", "dec_layers", "dim_feedforward", "nheads", "dropout", "backbone",
        "aux_loss", "set_cost_class", "set_cost_bbox", "set_cost_giou", "cls_loss_coef", "bbox_loss_coef",
        "giou_loss_coef", "eos_coef", "mask_loss_coef", "dice_loss_coef", "overflow_boxes",
        "track_query_false_positive_prob"))
    args.num_classes = fx["config"]["class_logits"] - 1  # + no-object
    return args


@pytest.fixture(scope="module")
def official_mots():
    fx = torch.load(MOTS_FIXTURE, weights_only=True)
    args = mots_args_from_fixture(fx)
    model, criterion, matcher = filled_model(fx, args)
    inputs = fx["inputs"]
    target = dict(inputs["targets_cur"], **inputs["criterion_track_queries"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        prev_out, prev_features = model(inputs["img_prev"])
        cur_out, _ = model(inputs["img_cur"], prev_features)
        track_out, _ = model(inputs["img_cur"], prev_features, tf.stack_track_queries([target]))
    torch.set_num_threads(threads)
    return dict(fx=fx, args=args, model=model, criterion=criterion, matcher=matcher, prev_out=prev_out,
                cur_out=cur_out, track_out=track_out, target=target)


def assert_outputs_close(ours, theirs, what, keys=("pred_logits", "pred_boxes", "hs_embed", "pred_masks")):
    for key in keys:
        assert_close(ours[key], theirs[key], f"{what}.{key}")
    assert len(ours["aux_outputs"]) == len(theirs["aux_outputs"])
    for i, (a, b) in enumerate(zip(ours["aux_outputs"], theirs["aux_outputs"])):
        for key in ("pred_logits", "pred_boxes"):
            assert_close(a[key], b[key], f"{what}.aux_outputs[{i}].{key}")


def test_no_deformable_defaults_are_the_official_train_yaml():
    args = tf.get_args_parser().parse_args(["--no-deformable"])
    assert (args.hidden_dim, args.num_queries, args.dim_feedforward) == (256, 100, 2048)
    assert (args.set_cost_class, args.cls_loss_coef, args.eos_coef, args.overflow_boxes) == (1.0, 1.0, 0.1, False)
    default = tf.get_args_parser().parse_args([])  # the MOT17 model's, unchanged
    assert (default.hidden_dim, default.num_queries, default.dim_feedforward) == (288, 500, 1024)
    assert (default.set_cost_class, default.cls_loss_coef, default.overflow_boxes) == (2.0, 2.0, True)
    assert tf.get_args_parser().parse_args(["--no-deformable", "--hidden_dim", "128"]).hidden_dim == 128


def test_mots_state_dict_matches_the_official_detr_segm_tracking(official_mots):
    shapes = official_mots["fx"]["shapes"]
    state = official_mots["model"].state_dict()
    assert set(state) == set(shapes)  # strict: the released vanilla checkpoints (mots20_train_masks.pth) load
    assert all(list(state[k].shape) == list(shapes[k][0]) for k in shapes)
    assert {"input_proj.weight", "query_embed.weight", "transformer.decoder.norm.weight",
            "bbox_attention.k_linear.weight", "mask_head.out_lay.weight"} <= set(state)
    assert not any(k.startswith("detr.") for k in state)


def test_mots_parity_frames_without_track_queries(official_mots):
    expected = official_mots["fx"]["outputs"]
    assert_outputs_close(official_mots["prev_out"], expected["frame_prev"], "frame_prev")
    assert_outputs_close(official_mots["cur_out"], expected["frame_cur"], "frame_cur")


def test_mots_parity_padded_batch_outputs_and_losses(official_mots, one_thread):
    """Two frames of different sizes in one batch (zero padding, its mask through attention and the mask head)."""
    fx = official_mots["fx"]
    expected = fx["outputs"]["batch"]
    targets = fx["inputs"]["batch_targets"]
    with torch.no_grad():
        out, _ = official_mots["model"](fx["inputs"]["batch_images"])
    assert_outputs_close(out, expected, "batch")
    losses = official_mots["criterion"](out, targets, [expected["indices"]] + list(expected["aux_indices"]))
    assert set(losses) == set(expected["losses"])
    for key, value in expected["losses"].items():
        assert_close(losses[key].float(), value.float(), f"batch {key}")


def test_mots_parity_track_queries_outputs_and_every_loss(official_mots):
    expected = official_mots["fx"]["outputs"]["criterion_frame_cur"]
    out, target = official_mots["track_out"], official_mots["target"]
    num_track = len(target["track_query_hs_embeds"])
    assert out["pred_masks"].shape[1] == num_track + official_mots["args"].num_queries
    assert_outputs_close(out, expected, "frame_cur with track queries")
    # the matcher's choice among object queries is fragile with filled weights (see the fixture's notes): the losses
    # are compared under the official indices; our matcher must still force the true track queries the same way
    indices = [expected["indices"]] + list(expected["aux_indices"])
    num_true = len(target["track_query_match_ids"])
    for layer, official_ind in zip([out] + out["aux_outputs"], indices):
        (src, tgt), = official_mots["matcher"](layer, [target])
        (esrc, etgt), = official_ind  # query indices sorted: the true track queries come first
        assert src[:num_true].tolist() == esrc[:num_true].tolist() and tgt[:num_true].equal(etgt[:num_true])
        fal_pos = target["track_queries_fal_pos_mask"].nonzero()[:, 0].tolist()
        assert not set(src.tolist()) & set(fal_pos)  # false-positive track queries stay unmatched
    losses = official_mots["criterion"](out, [target], indices)
    assert set(losses) == set(expected["losses"])
    for key, value in expected["losses"].items():
        assert_close(losses[key].float(), value.float(), key)
    assert official_mots["criterion"].weight_dict == {k: float(v) for k, v in expected["weight_dict"].items()}
    total = sum(losses[k] * w for k, w in official_mots["criterion"].weight_dict.items() if k in losses)
    assert_close(total, expected["loss_total_weighted"], "weighted total loss")


def test_mots_track_query_augmentation_reproduces_official_draws(official_mots):
    fx = official_mots["fx"]
    prev = {k: v for k, v in official_mots["prev_out"].items() if k != "aux_outputs"}
    target = dict(fx["inputs"]["targets_cur"], prev_target=fx["inputs"]["targets_prev"])
    prev_indices = [tuple(ind) for ind in fx["outputs"]["prev_indices"]]
    torch.manual_seed(fx["inputs"]["aug_seed"])
    tf.add_track_queries([target], prev_indices, prev, official_mots["args"].num_queries,
                         official_mots["args"].track_query_false_negatives,
                         official_mots["args"].track_query_false_positive_prob)
    for key, value in fx["inputs"]["criterion_track_queries"].items():
        assert target[key].shape == value.shape, key
        assert_close(target[key].float(), value.float(), key)


def test_mots_matcher_and_criterion_on_synthetic_outputs(official_mots):
    """Clear-cut predictions: the official matcher's indices for every layer and the official losses."""
    fx = official_mots["fx"]
    outputs, expected = fx["inputs"]["synthetic_outputs"], fx["outputs"]["synthetic"]
    target = official_mots["target"]
    layers = [{k: v for k, v in outputs.items() if k != "aux_outputs"}] + list(outputs["aux_outputs"])
    for i, (layer, official_ind) in enumerate(zip(layers, [expected["indices"]] + list(expected["aux_indices"]))):
        for (src, tgt), (esrc, etgt) in zip(official_mots["matcher"](layer, [target]), official_ind):
            assert src.tolist() == esrc.tolist() and tgt.tolist() == etgt.tolist(), f"layer {i}"
    losses = official_mots["criterion"](outputs, [target])
    assert set(losses) == set(expected["losses"])
    for key, value in expected["losses"].items():
        assert_close(losses[key].float(), value.float(), f"synthetic {key}")


def test_tracker_runs_on_the_vanilla_model_with_masks(one_thread):
    """Two frames through Tracker on --no-deformable --masks: births, a track query fed back (the un-normed
    embedding), masks per track, boxes clipped to the frame (overflow_boxes off)."""
    torch.manual_seed(0)
    args = tf.get_args_parser().parse_args(TINY + ["--no-deformable", "--masks", "--hidden_dim", "128", "--nheads",
                                                   "8"])
    model, _, _ = tf.build_model(args)
    with torch.no_grad():
        model.class_embed.bias[0] = 8.0  # every query a confident person
    model.eval()
    calls = []

    def detector(image, prev_features, track_queries):
        calls.append(track_queries)
        return model(image, prev_features, track_queries)

    tracker = tf.Tracker(detector, args.num_queries, overflow_boxes=args.overflow_boxes,
                         post_process=tf.detr.PostProcess())
    for _ in range(2):
        tracker.step(torch.randn(1, 3, 64, 80), torch.tensor([[128, 160]]))
    assert calls[0] is None and calls[1]["hs_embeds"].shape[-1] == 128
    first = [i for i, t in tracker.results.items() if 0 in t]
    assert first and all(1 in tracker.results[i] for i in first)  # every first-frame track is followed
    masks = [t[1]["mask"] for t in tracker.results.values() if 1 in t]
    assert all(m.shape == (128, 160) and m.dtype == bool for m in masks)
    assert np.sum(masks, 0).max() <= 1  # non-overlapping
    boxes = np.stack([t[1]["bbox"] for t in tracker.results.values() if 1 in t])
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 160).all() and (boxes[:, [1, 3]] <= 128).all()


def test_script_trains_and_tracks_mots20_with_the_vanilla_model(tmp_path):
    import common.synthetic as syn
    syn.write(tmp_path, only=["mots20"], images=10, size=(96, 80))  # 2 sequences of 5 frames
    small = TINY + ["--no-deformable", "--masks", "--hidden_dim", "128", "--nheads", "8", "--num_queries", "4",
                    "--dec_layers", "1", "--data_root", str(tmp_path / "mots20")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, str(ROOT / "trackformer.py"), *small, "--output_dir", str(out),
                          "--epochs", "1", "--max_iters", "2", "--detection_obj_score_thresh", "0.05"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert {"sMOTSA", "MOTSA", "IDF1", "HOTA"} <= set(result) and result["num_objects"] > 0
    tf.read_mots(out / "tracks" / "MOTS20-02.txt")
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert all(math.isfinite(log[0][f"train_{k}"]) for k in ("loss_ce", "loss_mask", "loss_dice"))
    # as a released checkpoint (no identity), loaded into the default Deformable-DETR model: one clear error
    torch.save({"model": torch.load(out / "checkpoint.pth", weights_only=False)["model"]}, tmp_path / "released.pth")
    wrong = subprocess.run([sys.executable, str(ROOT / "trackformer.py"), *TINY, "--masks", "--hidden_dim", "384",
                            "--nheads", "8", "--data_root", str(tmp_path / "mots20"), "--eval", "--resume",
                            str(tmp_path / "released.pth")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env=env)
    assert wrong.returncode != 0 and "vanilla-DETR TrackFormer checkpoint; load it with --no-deformable" in wrong.stderr
