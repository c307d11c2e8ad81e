"""Publishing a trained generalist: the model card and pushes to the 🤗 Hub that never stop a run.

A push is a network call in the middle of hours of training, so it must not be able to hurt the run:
:func:`push_folder` retries with exponential backoff and reports failure instead of raising, and
:class:`HubPusher` uploads from a background thread, from a hard-linked snapshot of the folder, so
the training loop neither waits for the network nor loses anything when a checkpoint it is
uploading is rotated away. The local checkpoint is always written first and never depends on a push.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from generalist import integrity

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
# What a model repo holds: save_pretrained artifacts of the model and the tokenizer, and the card.
# Training state (optimizer moments, RNG) stays local.
UPLOAD_IGNORE = ["state/*", "state/**", "trainer_state.json", ".tmp*", "*.tmp"]


def is_repo_id(text: str) -> bool:
    """``user/name`` as the Hub spells repo ids (one slash, characters it allows); callers check first that
    no local path of that name exists."""
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return text.count("/") == 1


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload generalist checkpoint",
    retries: int = 4,
    backoff_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    repo_type: str = "model",
) -> bool:
    """Create ``repo_id`` (a ``repo_type`` repo) if needed and upload ``folder``; retry with backoff; True when
    it landed.

    Waits ``backoff_s * 2**k`` seconds before retry ``k + 1``. Every failure is logged with its
    reason; after the last one this returns False rather than raising, because a training run
    must outlive a Hub outage.
    """
    api = HfApi(token=token)
    for attempt in range(retries + 1):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                              commit_message=commit_message, ignore_patterns=UPLOAD_IGNORE)
            logger.info("pushed %s to https://huggingface.co/%s", folder, repo_id)
            return True
        except Exception as e:  # network, auth, server errors: all are worth a retry, none may kill training
            if attempt == retries:
                logger.warning("push of %s to %s failed after %d attempts: %r; the local copy is kept",
                               folder, repo_id, retries + 1, e)
                return False
            wait = backoff_s * 2**attempt
            logger.warning("push to %s failed (%r); retry %d/%d in %.1fs", repo_id, e, attempt + 1, retries, wait)
            sleep(wait)
    return False


class HubPusher:
    """Uploads folders to one repo in a background thread; at most one upload waits (the newest wins).

    ``submit`` snapshots the folder with hard links (no copy of the weights), so the caller may
    delete or rotate the original right away. ``close`` waits for the pending upload.
    """

    def __init__(self, repo_id: str, staging_dir: str | os.PathLike, *, token: str | None = None,
                 private: bool = False, retries: int = 4, backoff_s: float = 2.0, timeout_s: float = 1800.0):
        self.repo_id, self.token, self.private = repo_id, token, private
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.staging_dir = Path(staging_dir)
        self.results: list[tuple[str, bool | None]] = []  # (commit message, landed; None: abandoned) per push
        self._pending: tuple[Path, str] | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._count = 0
        self._thread = threading.Thread(target=self._run, name="hub-pusher", daemon=True)
        self._thread.start()

    def submit(self, folder: str | os.PathLike, commit_message: str) -> None:
        self._count += 1
        snapshot = self.staging_dir / f"push-{self._count:05d}"
        _link_tree(Path(folder), snapshot)
        _manifest_of_what_ships(snapshot)
        with self._cond:
            if self._pending is not None:  # superseded before it started: drop it
                shutil.rmtree(self._pending[0], ignore_errors=True)
            self._pending = (snapshot, commit_message)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                snapshot, message = self._pending
                self._pending = None
            ok = self._push_with_timeout(snapshot, message)
            self.results.append((message, ok))
            if ok is not None:  # an abandoned push may still be reading its snapshot
                shutil.rmtree(snapshot, ignore_errors=True)

    def _push_with_timeout(self, snapshot: Path, message: str) -> bool | None:
        """:func:`push_folder` in its own thread, waited for at most ``timeout_s``: a call that blocks (a
        stalled connection) is abandoned with a warning (None), so the next checkpoint's push still goes."""
        outcome: list[bool] = []
        worker = threading.Thread(target=lambda: outcome.append(push_folder(
            snapshot, self.repo_id, token=self.token, private=self.private, commit_message=message,
            retries=self.retries, backoff_s=self.backoff_s)), name="hub-push", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            logger.warning("push %r to %s did not finish within %.0f s: abandoned (the local checkpoint is kept; "
                           "the next push goes on)", message, self.repo_id, self.timeout_s)
            return None
        return outcome[0]

    def close(self) -> list[tuple[str, bool | None]]:
        """Finish the pending upload (at most ``timeout_s``) and stop; returns ``(commit message, landed)`` per
        push, landed ``None`` for one abandoned after ``timeout_s``."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        return self.results


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a folder by hard links where the filesystem allows (instant, no extra space)."""
    if dst.exists():
        shutil.rmtree(dst)

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns("state", "trainer_state.json", ".tmp*"))


def _manifest_of_what_ships(snapshot: Path) -> None:
    """Keep only the manifest entries of files the snapshot holds: a checkpoint's manifest also lists its
    training state, which stays local, and a downloaded repo must verify against its own manifest."""
    try:
        entries = integrity.read_manifest(snapshot)
    except ValueError:
        entries = None
    if entries is None:
        return
    manifest = snapshot / integrity.MANIFEST
    manifest.unlink(missing_ok=True)  # a hard link to the checkpoint's own manifest: never write through it
    manifest.write_text(json.dumps({k: v for k, v in entries.items() if (snapshot / k).is_file()}, indent=2))


# --- model card ----------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


RESULTS_START, RESULTS_END = "<!-- control results: written by eval.control -->", "<!-- end of control results -->"
CARD_TAGS = ("generalist", "gato", "decision-transformer", "trajectory-transformer", "multimodal",
             "reinforcement-learning")


def model_card(
    *,
    model_id: str,
    mixture: Mapping[str, float],
    metrics: Mapping[str, Mapping[str, float]],
    reproduce: str,
    summary: Mapping[str, Any],
    tasks: Sequence[str] = (),
    eval_results: Sequence[EvalResult] = (),
) -> str:
    """The README.md of a checkpoint: what it is, what it was trained on, how well, how to rebuild it.

    Args:
        model_id: the repo id (or run name) the card is for; used in the loading snippet.
        mixture: dataset name -> sampling weight.
        metrics: row name (``train``, ``eval``) -> modality -> loss.
        reproduce: the exact command that trained it.
        summary: key facts (parameters, steps, tokens, wall time...).
        tasks: control tasks the tokenizer knows (each becomes a tag).
        eval_results: rollout scores (:func:`control_eval_results`), in the card's metadata
            (``model-index``, which the Hub shows) and as a table.
    """
    total = sum(mixture.values()) or 1.0
    mix_rows = [[name, f"{w / total:.1%}"] for name, w in mixture.items()]
    modalities = sorted({m for row in metrics.values() for m in row})
    metric_rows = [[split, *[row.get(m, "") for m in modalities]] for split, row in metrics.items()]
    data = ModelCardData(library_name="transformers", license="apache-2.0", pipeline_tag="reinforcement-learning",
                         tags=[*CARD_TAGS, *tasks], datasets=list(mixture) or None, model_name=model_id,
                         eval_results=list(eval_results) or None)
    facts = "\n".join(f"- **{k}**: {v}" for k, v in summary.items())
    return f"""---
{data.to_yaml()}
---

# {model_id}

A generalist agent in the style of Gato (Reed et al. 2022): one causal transformer over text, image
patches, discrete and continuous values, trained with the `generalist` library. The same weights run
Gato-style prompting, Decision Transformer (return-conditioned) and Trajectory Transformer (planning)
decoding, image captioning and text generation.

## Use

```python
import gymnasium as gym
from generalist import Agent, GeneralistForCausalLM, GeneralistTokenizer

model = GeneralistForCausalLM.from_pretrained("{model_id}")  # also AutoModelForCausalLM once generalist is imported
tokenizer = GeneralistTokenizer.from_pretrained("{model_id}")  # not AutoTokenizer: it tokenizes every modality
agent = Agent(model, tokenizer, "gato")
```

Evaluate it in real environments (downloads it, rolls out, writes scores into this card with `--update_card`):

```bash
python -m eval.control --model {model_id} --mode gato --episodes 20
```

## Training

{facts}

Mixture (share of packed training sequences):

{_table(["dataset", "weight"], mix_rows)}

Control tasks: {", ".join(f"`{t}`" for t in tasks) if tasks else "none"}.

## Results

{results_block(eval_results)}

Next-token cross entropy per target modality (nats):

{_table(["split", *modalities], metric_rows) if metric_rows else "not measured"}

## Reproduce

```bash
{reproduce}
```
"""


def results_block(eval_results: Sequence[EvalResult]) -> str:
    """The card's rollout table (between markers, so that a later evaluation replaces it)."""
    rows = [[r.dataset_name, r.metric_name or r.metric_type, r.metric_value] for r in eval_results]
    body = (_table(["task", "metric", "value"], rows) if rows
            else "Rollouts: not measured yet (`python -m eval.control --model THIS --update_card`).")
    return f"{RESULTS_START}\n{body}\n{RESULTS_END}"


def control_eval_results(results: Sequence[Mapping[str, Any]]) -> list[EvalResult]:
    """EvalResults of ``eval.control`` records (one per task): mean return ± stderr and the expert-normalised
    score, as the Hub's reinforcement-learning cards state them (``metric_type: mean_reward``)."""
    out = []
    for r in results:
        if not r.get("episodes"):
            continue
        mode, task = r["mode"], r["task"]
        common = dict(task_type="reinforcement-learning", dataset_type=task, dataset_name=task)
        out.append(EvalResult(**common, metric_type="mean_reward", metric_name=f"mean return, {mode} mode",
                              metric_value=f"{r['mean_return']:.2f} +/- {r['stderr_return']:.2f}"))
        if "normalized_score" in r:
            out.append(EvalResult(**common, metric_type="expert_normalized_score",
                                  metric_name=f"expert-normalised score, {mode} mode ({r['episodes']} episodes)",
                                  metric_value=round(float(r["normalized_score"]), 4)))
    return out


def update_card_results(card_path: str | os.PathLike, results: Sequence[Mapping[str, Any]]) -> ModelCard:
    """Merge ``eval.control`` records into a card (a new one where there is none): metadata and table; a
    task's earlier score in the same mode is replaced, other modes and tasks kept."""
    card = (ModelCard.load(card_path) if Path(card_path).is_file()
            else ModelCard("---\nlibrary_name: transformers\n---\n"))
    new = control_eval_results(results)
    replaced = {(r.dataset_name, r.metric_name) for r in new}
    kept = [r for r in card.data.eval_results or [] if (r.dataset_name, r.metric_name) not in replaced]
    merged = kept + new
    card.data.eval_results = merged or None
    card.data.model_name = card.data.model_name or Path(card_path).parent.name
    card.data.pipeline_tag = "reinforcement-learning"
    tags = list(card.data.tags or [])
    card.data.tags = tags + sorted({r.dataset_name for r in new} - set(tags))
    block = results_block(merged)
    if RESULTS_START in card.text and RESULTS_END in card.text:
        head, rest = card.text.split(RESULTS_START, 1)
        card.text = head + block + rest.split(RESULTS_END, 1)[1]
    else:
        card.text = card.text.rstrip() + "\n\n## Results\n\n" + block + "\n"
    card.save(card_path)
    return card


def write_model_card(folder: str | os.PathLike, **kwargs: Any) -> Path:
    """Write :func:`model_card` as ``folder/README.md``."""
    path = Path(folder) / CARD_FILE
    path.write_text(model_card(**kwargs))
    return path
