"""GeneralistForCausalLM: both backbone families, Auto classes, save/load, weighted loss, KV cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM

from generalist import GeneralistConfig, GeneralistForCausalLM, Modality, TaskSpec
from tests.conftest import SPACES, random_episode


@pytest.fixture
def mixed_batch(tok):
    spec = TaskSpec.from_spaces("pix", *SPACES["pixels-tuple"])
    tok.add_task_spec(spec)
    ep = random_episode(spec, *SPACES["pixels-tuple"], steps=3)
    return tok([ep, "import os\nprint(os.sep)", {"image": Image.new("RGB", (50, 30), "blue"), "caption": "blue"}])


@pytest.fixture(params=["llama", "gpt2", "llama-value-features", "llama-no-bin-embeddings"])
def model(request, tiny_config, tiny_gpt2_config):
    torch.manual_seed(0)
    config = tiny_gpt2_config if request.param == "gpt2" else tiny_config
    if request.param in ("llama-value-features", "llama-no-bin-embeddings"):
        config.value_features = 3
        config.bin_embeddings = request.param != "llama-no-bin-embeddings"
    return GeneralistForCausalLM(config).eval()


def test_value_features_order_continuous_embeddings(tiny_config, tok):
    """With value features, neighbouring continuous bins start close and the two signs far apart;
    other tokens are untouched (a Gato-style model has no notion of a bin's order)."""
    torch.manual_seed(0)
    tiny_config.value_features = 3
    model = GeneralistForCausalLM(tiny_config).eval()
    span = tok.layout.ranges["continuous"]
    mid = (span.start + span.stop) // 2
    with torch.no_grad():
        v = model.value_embed(torch.tensor([[mid - 300, mid - 1, mid, span.start - 1, span.stop]]))[0]
    assert (v[1] - v[2]).norm() < (v[0] - v[2]).norm()  # bins next to each other: close
    assert torch.equal(v[3:], torch.zeros_like(v[3:]))  # text and discrete tokens get nothing
    plain = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(),
                                                   text_config=tiny_config.text_config.to_dict()))
    assert not hasattr(plain, "value_embed")


def test_without_bin_embeddings_a_value_is_embedded_by_where_it_lies(tiny_config, mixed_batch, tok):
    """``bin_embeddings=False``: the embedding table's rows of continuous bins are never read (a rare
    bin cannot carry a near-random row), text and discrete tokens still use theirs; the option needs
    value features."""
    torch.manual_seed(0)
    tiny_config.value_features = 3
    tiny_config.bin_embeddings = False
    model = GeneralistForCausalLM(tiny_config).eval()
    span = tok.layout.ranges["continuous"]
    with torch.no_grad():
        before = model(**mixed_batch).logits
        model.get_input_embeddings().weight[span.start: span.stop].normal_()
        assert torch.equal(model(**mixed_batch).logits, before)
        model.get_input_embeddings().weight[: span.start].normal_()
        assert not torch.allclose(model(**mixed_batch).logits, before)
    with pytest.raises(ValueError, match="needs value_features"):
        GeneralistConfig(text_config=tiny_config.text_config.to_dict(), value_features=0, bin_embeddings=False)


def test_forward_both_backbones(model, mixed_batch, tok):
    out = model(**mixed_batch)
    assert out.logits.shape == (*mixed_batch["input_ids"].shape, tok.vocab_size)
    assert torch.isfinite(out.loss)
    assert set(out.modality_losses) >= {"text", "caption", "observation", "action", "reward", "return"}
    out.loss.backward()
    assert model.patch_encoder.stem.weight.grad.abs().sum() > 0  # pixels reach the loss


def test_auto_classes_and_save_load_bit_identical(model, mixed_batch, tok, tmp_path):
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "generalist"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is GeneralistForCausalLM
    assert type(loaded.backbone) is type(model.backbone)
    with torch.no_grad():
        ours, theirs = model(**mixed_batch), loaded(**mixed_batch)
    assert torch.equal(theirs.logits, ours.logits)
    # the loss too: its per-modality weights once sat in a non-persistent buffer that from_pretrained
    # left uninitialised, so a loaded model (fine-tuning, held-out loss) trained on garbage weights
    assert torch.equal(theirs.loss, ours.loss)
    assert AutoModelForCausalLM.from_config(model.config).num_parameters() == model.num_parameters()


def test_loss_ignores_padding_and_image_placeholders(tiny_config, mixed_batch):
    torch.manual_seed(0)
    model = GeneralistForCausalLM(tiny_config).eval()
    out = model(**mixed_batch)
    # the same loss, recomputed by hand from the logits and the documented per-modality weights
    logits, labels, mod = out.logits[:, :-1], mixed_batch["labels"][:, 1:], mixed_batch["modality_ids"][:, 1:]
    w = torch.tensor([tiny_config.loss_weights[m.name.lower()] for m in Modality])[mod]
    w = w * (labels != -100)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
    assert torch.allclose(out.loss, (ce * w).sum() / w.sum(), atol=1e-6)
    assert w[mod == Modality.IMAGE].sum() == 0 and w[mod == Modality.PAD].sum() == 0
    # changing what sits at padding positions changes nothing
    batch = dict(mixed_batch)
    pad = batch["attention_mask"] == 0
    batch["labels"] = batch["labels"].masked_fill(pad, 5)
    batch["modality_ids"] = batch["modality_ids"].masked_fill(pad, int(Modality.PAD))
    assert torch.allclose(model(**batch).loss, out.loss)


def test_kv_cache_matches_full_forward(model, tok):
    spec = TaskSpec.from_spaces("cp", spaces.Box(-5, 5, (4,), np.float32), spaces.Discrete(2))
    sample = tok.encode_episode(spec, **{k: v for k, v in random_episode(
        spec, *SPACES["box-discrete"], steps=6).items() if k != "task"})
    ids = torch.from_numpy(sample["input_ids"])[None]
    local = torch.from_numpy(sample["local_positions"])[None]
    with torch.no_grad():
        full = model(input_ids=ids, local_positions=local).logits
        first = model(input_ids=ids[:, :20], local_positions=local[:, :20], use_cache=True)
        nxt = model(input_ids=ids[:, 20:], local_positions=local[:, 20:], cache=first.cache, use_cache=True)
    assert torch.allclose(torch.cat([first.logits, nxt.logits], 1), full, atol=1e-5)
    assert nxt.cache.get_seq_length() == ids.shape[1]


def test_image_token_patch_mismatch_is_an_error(model, mixed_batch):
    batch = dict(mixed_batch, patches=mixed_batch["patches"][:-1], patch_positions=mixed_batch["patch_positions"][:-1])
    with pytest.raises(ValueError, match="<image> tokens"):
        model(**batch)


def test_bad_config_values_are_errors():
    with pytest.raises(ValueError, match="unknown modality 'actions'"):
        GeneralistConfig(loss_weights={"actions": 1.0})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        GeneralistConfig(image_size=40)


@pytest.mark.parametrize("damage", ["truncate", "flip", "truncate-no-manifest"])
def test_damaged_weights_are_an_error_naming_the_file(tiny_config, tmp_path, damage):
    GeneralistForCausalLM(tiny_config).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF  # a bit flip inside a tensor: only the checksum can see it
    else:
        data = data[: len(data) // 2]
    weights.write_bytes(bytes(data))
    if damage == "truncate-no-manifest":  # written before the manifest: safetensors' own check names it
        (tmp_path / "manifest.json").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("vocab_range", [(0, 7), (100, 1124), (4000, 4102)])
def test_vocab_range_logits_equal_sliced_full_logits(model, mixed_batch, vocab_range):
    """``vocab_range`` computes only the head rows it needs, with the values of slicing the full logits.

    Equal up to float rounding, not bitwise: the BLAS blocks a 1024-column product differently from
    a 4102-column one (differences ~1e-7).
    """
    lo, hi = vocab_range
    hi = min(hi, model.config.vocab_size)
    inputs = {k: v for k, v in mixed_batch.items() if k not in ("labels", "loss_weights")}
    with torch.no_grad():
        full = model(**inputs).logits
        part = model(**inputs, vocab_range=(lo, hi)).logits
        last = model(**inputs, vocab_range=(lo, hi), logits_to_keep=1).logits
    assert part.shape == (*full.shape[:2], hi - lo)
    torch.testing.assert_close(part, full[..., lo:hi], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, full[:, -1:, lo:hi], rtol=1e-5, atol=1e-5)
    assert torch.equal(part.argmax(-1), full[..., lo:hi].argmax(-1))
    with pytest.raises(ValueError, match="vocab_range"):
        model(**inputs, vocab_range=(5, 5))
