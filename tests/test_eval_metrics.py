"""Evaluation metrics and reports: CIDEr-D and BLEU on hand-made captions, perplexity of a random
model, the caption and text scripts end to end, and a report built from a synthetic run folder."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from eval import caption as caption_eval
from eval import report
from eval import text as text_eval
from eval.metrics import CiderD, bleu, cider_d, exact_match, normalize, words
from eval.plots import plot_learning_curves
from generalist import GeneralistForCausalLM, GeneralistTokenizer, TaskSpec
from generalist.training.metrics import MetricLog
from generalist.training.run_folder import RunFolder
from generalist.vocab import Modality
from tests.conftest import DEFAULT_TOKENIZER

# --- CIDEr-D ---------------------------------------------------------------------------------------


def test_cider_d_perfect_match_by_hand():
    # Two images, one reference each. N = 2, so idf(g) = log 2 - log df(g):
    #   "a" is in both references -> idf 0; "cat", "dog", "a cat", "a dog" -> idf log 2.
    # Candidate "a cat" for image 0: unigram vectors (a: 0, cat: log 2) on both sides -> cosine 1;
    # bigram ("a cat": log 2) -> cosine 1; no 3- or 4-grams -> 0. Same length -> no penalty.
    # CIDEr-D = 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # For image 1 ("a dog") the only shared n-gram is "a", whose weight is 0 -> 0.
    scorer = CiderD([["a cat"], ["a dog"]])
    assert scorer.scores(["a cat", "a cat"]) == pytest.approx([5.0, 0.0])
    assert cider_d(["a cat", "a cat"], [["a cat"], ["a dog"]]) == pytest.approx(2.5)


def test_cider_d_length_penalty_and_clipping_by_hand():
    # Candidate "cat cat" against "a cat" (same corpus as above). Unigrams: candidate (cat: 2 log 2),
    # reference (a: 0, cat: log 2). Clipped dot = min(2 log 2, log 2) * log 2 = log²2; norms 2 log 2 and
    # log 2 -> cosine 1/2. No shared bigram. Same length (2 words) -> no penalty. 10 * (1/2) / 4 = 1.25.
    assert CiderD([["a cat"], ["a dog"]]).score_one(0, "cat cat") == pytest.approx(1.25)
    # Candidate "a cat a cat": unigram cosine (2 log 2 clipped to log 2 -> log²2) / (2 log 2 * log 2) = 1/2,
    # bigram ("a cat": 2 log 2 vs log 2; "cat a" unseen, idf log 2): dot log²2, norms sqrt(5) log 2 and log 2
    # -> 1/sqrt(5); length 4 vs 2 -> penalty exp(-4 / 72).
    expected = 10 * (0.5 + 1 / math.sqrt(5)) / 4 * math.exp(-4 / 72)
    assert CiderD([["a cat"], ["a dog"]]).score_one(0, "a cat a cat") == pytest.approx(expected)


def test_cider_d_identical_caption_scores_highest():
    refs = [["a small red circle left of a large blue square"], ["a green triangle in the top left"],
            ["a large yellow square above a small red circle"], ["a cart pole leaning left"]]
    scorer = CiderD(refs)
    perfect = scorer.score_one(0, refs[0][0])
    assert perfect == pytest.approx(10.0)  # every n-gram order has informative n-grams -> cosine 1 each
    for worse in ["a small red circle left of a large green square",  # one word wrong
                  "a small red circle left of a large blue",  # one word missing
                  "a large blue square left of a small red circle",  # objects swapped
                  "a small red circle left of a large blue square square square",  # repetition
                  "a green triangle in the top left", ""]:
        assert scorer.score_one(0, worse) < perfect, worse
    assert scorer.score_one(0, "A small, red circle left of a large blue square.") == pytest.approx(perfect)


def test_cider_d_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least one"):
        CiderD([])
    with pytest.raises(ValueError, match="non-empty list"):
        CiderD(["a cat"])  # a string where a list of references belongs
    with pytest.raises(ValueError, match="2 candidates for 1 images"):
        cider_d(["a", "b"], [["a"]])


# --- BLEU and exact match --------------------------------------------------------------------------


def test_bleu_identical_disjoint_and_partial():
    refs = [["a small red circle left of a large blue square"], ["a cart pole leaning left on the track"]]
    same = [r[0] for r in refs]
    assert bleu(same, refs) == pytest.approx(100.0)
    assert bleu(["zebra giraffe okapi", "one two three"], refs) == pytest.approx(0.0)
    partial = bleu(["a small red circle left of a large green square", "a cart pole leaning right on the track"], refs)
    assert 0.0 < partial < 100.0
    # images may have different numbers of references; a match with any of them counts
    assert bleu(same, [refs[0] + ["another caption"], refs[1]]) == pytest.approx(100.0)


def test_exact_match_normalises_case_and_punctuation():
    assert words("A red, Circle.") == ["a", "red", "circle"]
    assert normalize("  A red   circle! ") == "a red circle"
    assert exact_match(["A red circle.", "a blue square"], [["a red circle"], ["a blue circle"]]) == 0.5
    assert exact_match([], []) == 0.0


# --- perplexity ------------------------------------------------------------------------------------


@pytest.fixture
def random_model(tiny_config):
    torch.manual_seed(0)
    return GeneralistForCausalLM(tiny_config).eval()


def test_perplexity_of_a_random_model_is_vocabulary_scale(random_model, tok):
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."]
    result = text_eval.perplexity(random_model, tok, texts, max_length=512, batch_size=2, progress=False)
    # an untrained model is close to uniform over the whole vocabulary
    assert math.isfinite(result.perplexity)
    assert tok.vocab_size / 2 < result.perplexity < tok.vocab_size * 2
    # the same number computed by hand from the logits: mean NLL of the text targets only
    nll, n = 0.0, 0
    for t in texts:
        batch = tok.collate([tok.encode_text_sample(t)])
        with torch.no_grad():
            logits = random_model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, :-1]
        targets, modality = batch["input_ids"][0, 1:], batch["modality_ids"][0, 1:]
        ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        nll += float(ce[modality == Modality.TEXT].sum())
        n += int((modality == Modality.TEXT).sum())
    assert result.tokens == n
    assert result.nll == pytest.approx(nll / n, rel=1e-5)


def test_perplexity_windows_score_every_token_but_each_window_start(random_model, tok):
    text = "x = 1\n" * 60
    full = len(tok.encode_text_sample(text)["input_ids"])
    result = text_eval.perplexity(random_model, tok, [text], max_length=32, progress=False)
    assert result.windows == math.ceil(full / 32)
    assert result.tokens == full - result.windows  # <bos> and each window's first token have no target
    with pytest.raises(ValueError, match="at least 2"):
        text_eval.windows([tok.encode_text_sample(text)], 1)


# --- the scripts and the report on a synthetic run folder ------------------------------------------


def _caption_data(path):
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    rows = {"image": [Image.new("RGB", (64, 64), c) for c in colours.values()],
            "caption": [f"a {name} square" for name in colours]}
    features = Features({"image": ImageFeature(), "caption": Value("string")})
    split = Dataset.from_dict(rows, features=features)
    DatasetDict(train=split, test=split).save_to_disk(str(path))
    return path


def _text_data(path):
    rows = {"text": ["import os\nprint(os.getcwd())\n", "a short line of prose."]}
    DatasetDict(train=Dataset.from_dict(rows), validation=Dataset.from_dict(rows)).save_to_disk(str(path))
    return path


@pytest.fixture
def run_dir(tmp_path, random_model):
    """A run folder as train.py leaves it: metric CSVs (written by train.py's own logger), summary, model."""
    tok = GeneralistTokenizer.from_pretrained(DEFAULT_TOKENIZER)
    tok.add_task_spec(TaskSpec.from_env(gym.make("CartPole-v1"), expert_return=500.0, random_return=22.0))
    folder = RunFolder(tmp_path / "runs" / "tiny")
    run = folder.root
    run.mkdir(parents=True)
    modalities = ("text", "caption", "action")
    train_log = MetricLog(folder.train_csv, None, "train")
    eval_log = MetricLog(folder.eval_csv, None, "eval")
    for step in range(1, 5):
        train_log.add({"step": step * 10, "tokens": step * 4096, "loss": 9.0 / step,
                       **{m: 8.0 / step + i for i, m in enumerate(modalities)}})
        if step % 2 == 0:
            eval_log.add({"step": step * 10, "tokens": step * 4096,
                          **{m: 8.5 / step + i for i, m in enumerate(modalities)}})
    folder.summary.write_text(json.dumps({"steps": 40, "tokens": 16384, "train_wall_s": 12.5,
                                                       "tokens_per_s": 1310.7, "parameters": 123456}))
    random_model.save_pretrained(folder.model)
    tok.save_pretrained(folder.model)
    return run


def test_caption_and_text_scripts_write_results(run_dir, tmp_path):
    cap = caption_eval.main(caption_eval.Args(model=run_dir, data=_caption_data(tmp_path / "captions"),
                                              max_new_tokens=4, examples=3))
    assert (run_dir / "eval" / caption_eval.RESULTS_FILE).is_file()
    assert (run_dir / "eval" / caption_eval.EXAMPLES_FILE).stat().st_size > 0
    m = cap["metrics"]
    assert m["samples"] == 3 and 0 <= m["bleu"] <= 100 and 0 <= m["cider_d"] <= 10 and 0 <= m["exact_match"] <= 1
    assert [c["reference"] for c in cap["captions"]] == ["a red square", "a green square", "a blue square"]

    beam = caption_eval.main(caption_eval.Args(model=run_dir / "model", data=tmp_path / "captions", beam=2,
                                               max_new_tokens=3, max_samples=2, out=tmp_path / "beam"))
    assert beam["decoding"]["beam"] == 2 and len(beam["captions"]) == 2

    txt = text_eval.main(text_eval.Args(model=run_dir / "model", data=_text_data(tmp_path / "text")))
    saved = json.loads((run_dir / "eval" / report.TEXT_RESULTS).read_text())  # the run's eval/, not model/eval/
    assert saved["perplexity"] == pytest.approx(txt["perplexity"]) and math.isfinite(saved["perplexity"])


def test_report_from_a_synthetic_run(run_dir, tmp_path):
    caption_eval.main(caption_eval.Args(model=run_dir, data=_caption_data(tmp_path / "captions"), max_new_tokens=3))
    text_eval.main(text_eval.Args(model=run_dir, data=_text_data(tmp_path / "text")))
    path = report.write_report(run_dir)
    md = path.read_text()
    assert path == run_dir / "report.md"
    for heading in ("## Run", "## Learning curves", "## Control", "## Image captioning", "## Text"):
        assert heading in md
    assert "![learning curves](report/learning_curves.png)" in md
    assert (run_dir / "report" / "learning_curves.png").stat().st_size > 0
    assert "![example captions](eval/caption_examples.png)" in md
    assert "| a red square |" in md
    ppl = json.loads((run_dir / "eval" / report.TEXT_RESULTS).read_text())["perplexity"]
    assert report.fmt(ppl) in md
    assert "16,384" in md  # training tokens from metrics.json
    # no control results yet: said so, and one episode rendered with the Agent for the strip
    assert f"{report.NOT_RUN}: no control results" in md
    assert "![rollout](report/rollout.png)" in md and "CartPole-v1, dt mode" in md
    assert (run_dir / "report" / "rollout.png").stat().st_size > 0


def test_report_control_section_reads_results_sweep_and_frames(tmp_path):
    # eval.control had not landed when this was written: the results below follow the layout
    # eval.report documents (records of task, mode, mean_return, normalized_score; dt_sweep; frames)
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    results = {"results": [{"task": "CartPole-v1", "mode": "gato", "mean_return": 187.5, "normalized_score": 0.34},
                           {"task": "CartPole-v1", "mode": "dt", "mean_return": 412.0, "normalized_score": 0.81},
                           {"task": "Pendulum-v1", "mode": "dt", "mean_return": -640.25}],
               "dt_sweep": [{"task": "CartPole-v1", "target_return": t, "mean_return": 0.8 * t} for t in (100, 300)]}
    (run / "eval" / "control.json").write_text(json.dumps(results))
    np.save(run / "eval" / "rollout_frames.npy", np.zeros((9, 32, 48, 3), np.uint8))
    md = report.control_section(run, run / "report")
    assert "| CartPole-v1 | 412.0 (0.81) | 187.5 (0.34) |" in md  # columns: modes sorted (dt, gato)
    assert "| Pendulum-v1 | -640.2 | – |" in md or "| Pendulum-v1 | -640.3 | – |" in md
    assert "![DT return sweep](report/dt_sweep.png)" in md and (run / "report" / "dt_sweep.png").is_file()
    assert "A rollout saved by eval.control" in md and (run / "report" / "rollout.png").is_file()
    # a BabyAI run shown other objects' missions (eval.control --swap_mission) is a column of its own, not gato's
    (run / "eval" / "control_gato_swapped_mission.json").write_text(json.dumps({"results": [
        {"task": "CartPole-v1", "mode": "gato", "mean_return": 9.0, "swapped_missions": 20}]}))
    md = report.control_section(run, run / "report")
    assert "| task | dt | gato | gato (mission swapped) |" in md and "| 187.5 (0.34) | 9.0 |" in md
    (run / "eval" / "control_gato_blanked_mission.json").write_text(json.dumps({"results": [  # --blank_mission
        {"task": "CartPole-v1", "mode": "gato", "mean_return": 7.0, "blanked_missions": 20}]}))
    md = report.control_section(run, run / "report")
    assert "| task | dt | gato | gato (mission blanked) | gato (mission swapped) |" in md
    # the nested {task: {mode: scores}} layout gives the same records
    nested = report.control_records({"CartPole-v1": {"dt": {"mean_return": 412.0}}})
    assert nested == [{"task": "CartPole-v1", "mode": "dt", "mean_return": 412.0}]


def test_report_says_not_run_and_invents_nothing(tmp_path):
    run = tmp_path / "empty-run"
    run.mkdir()
    md = report.build_report(run)
    assert md.count(report.NOT_RUN) == 6  # run, curves, control results, rollout strip, captions, text
    assert not any(ch.isdigit() for line in md.splitlines() if line.startswith("|") for ch in line)
    assert not (run / "report").exists() or not any((run / "report").iterdir())


def test_learning_curves_plot_a_panel_per_modality(tmp_path):
    rows = [{"step": s, "tokens": s * 10.0, "text": 5.0 / s, "action": 3.0 / s} for s in (1.0, 2.0, 3.0)]
    csv_rows = [{k: str(v) for k, v in r.items()} | {"reward": ""} for r in rows]  # as read back from the CSV
    for train_rows in (rows, csv_rows):
        png = plot_learning_curves(train_rows, rows[-1:], tmp_path / "curves.png")
        assert np.asarray(Image.open(png)).shape[-1] in (3, 4)
    with pytest.raises(ValueError, match="no per-modality loss"):
        plot_learning_curves([{"step": 1, "loss": 2.0}], [], tmp_path / "none.png")
