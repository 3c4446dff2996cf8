"""Tests for models/text.py: the scratch encoder and its word tokenizer, the BERT and CLIP paths on
tiny random models with hand-written vocabularies (saved into tmp_path, nothing downloaded, each
compared with transformers' own model as the reference), CEP on text tokens, and the errors."""
import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pytest
import torch

from models.cep import cep_noise
from tests.helpers import make_tiny_bert
from models.text import (BOS, EOS, PAD, UNK, SPECIAL_TOKENS, build_text_encoder, cep_on_tokens,
                         rebuild_text_encoder)

CAPTIONS = ["a photo of a T-shirt", "A black-and-white photo of an ankle boot.", "a sneaker, 2 of them"]
WORDS = sorted({"a", "photo", "of", "t", "shirt", "black", "and", "white", "an", "ankle", "boot", "sneaker", "2", "them"})


def scratch(max_length=12, seed=0):
    torch.manual_seed(seed)
    return build_text_encoder("scratch", captions=CAPTIONS, max_length=max_length).eval()


# ---------------------------------------------------------------------------------------------
# scratch
# ---------------------------------------------------------------------------------------------

def test_scratch_vocab_is_sorted_and_deterministic():
    a, b = scratch(), scratch()
    assert a.config()["vocab"] == WORDS
    assert build_text_encoder("scratch", captions=CAPTIONS[::-1]).config()["vocab"] == WORDS  # order-free
    assert a.tokenizer.vocab_size == len(SPECIAL_TOKENS) + len(WORDS) == a.token_embedding.num_embeddings
    assert torch.equal(a.tokenize(CAPTIONS)["input_ids"], b.tokenize(CAPTIONS)["input_ids"])


def test_scratch_tokenize_round_trip_unknown_padding_truncation():
    enc = scratch(max_length=8)
    out = enc.tokenize(["A photo of a T-shirt", "a zebra photo", "", "a a a a a a a a a a photo"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (4, 8)
    words = list(SPECIAL_TOKENS) + WORDS
    assert [words[i] for i in ids[0, :8]] == ["[BOS]", "a", "photo", "of", "a", "t", "shirt", "[EOS]"]
    assert ids[1, :5].tolist() == [BOS, WORDS.index("a") + 4, UNK, WORDS.index("photo") + 4, EOS]
    assert ids[1, 5:].eq(PAD).all()
    # the null caption: start and end token, then padding
    assert ids[2].tolist() == [BOS, EOS] + [PAD] * 6
    # truncated to max_length with the end token kept; no padding left
    assert ids[3].tolist() == [BOS] + [WORDS.index("a") + 4] * 6 + [EOS]
    assert mask.tolist() == [[1] * 8, [1] * 5 + [0] * 3, [1, 1] + [0] * 6, [1] * 8]


def test_scratch_output_shape_and_padding_is_masked():
    enc = scratch(max_length=12)
    tok = enc.tokenize(CAPTIONS + [""])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    with torch.no_grad():
        out = enc(ids, mask)
        assert out.shape == (4, 12, 128) and enc.width == 128 and torch.isfinite(out).all()
        # other ids at the padded positions, and a different [PAD] embedding: real positions unchanged
        g = torch.Generator().manual_seed(0)
        other = torch.where(mask.bool(), ids, torch.randint(4, enc.tokenizer.vocab_size, ids.shape, generator=g))
        enc.token_embedding.weight[PAD] += 1.0
        out2 = enc(other, mask)
        real = mask.bool()
        torch.testing.assert_close(out2[real], out[real], rtol=0, atol=1e-6)
        # the check has power: without the key-padding mask the same change moves the real tokens
        out3, out4 = enc(ids, torch.ones_like(mask)), enc(other, torch.ones_like(mask))
        assert (out3[real] - out4[real]).abs().max() > 1e-3


def test_scratch_config_rebuild_is_exact(tmp_path):
    enc = scratch()
    with torch.no_grad():  # train a little so that the weights are not the initial ones
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = json.loads(json.dumps(enc.config()))  # JSON-safe
    torch.save(dict(text_config=cfg, text=enc.state_dict()), tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.manual_seed(123)  # a different initialisation, overwritten by the state dict
    re_enc = rebuild_text_encoder(ckpt["text_config"], ckpt["text"]).eval()
    tok, re_tok = enc.tokenize(CAPTIONS + ["zebra"]), re_enc.tokenize(CAPTIONS + ["zebra"])
    assert all(torch.equal(tok[k], re_tok[k]) for k in tok)
    with torch.no_grad():
        assert torch.equal(enc(**tok), re_enc(**re_tok))
    assert enc.trainable and not enc.is_frozen and all(p.requires_grad for p in enc.parameters())


# ---------------------------------------------------------------------------------------------
# CLIP and BERT on tiny random models
# ---------------------------------------------------------------------------------------------

def make_tiny_clip(folder):
    """A random 2-layer CLIP text tower and a byte-level BPE vocabulary of a few words."""
    from transformers import CLIPTextConfig, CLIPTextModel
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "p h", "ph o", "pho t", "phot o</w>", "o f</w>"]
    tokens = letters + [l + "</w>" for l in letters] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    model = CLIPTextModel(cfg).eval()
    model.save_pretrained(folder)
    return model, vocab


def test_clip_matches_transformers_and_is_frozen(tmp_path):
    ref, vocab = make_tiny_clip(tmp_path / "clip")
    enc = build_text_encoder(f"clip:{tmp_path / 'clip'}", max_length=10)
    assert enc.is_frozen and not enc.trainable and enc.width == 32
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # stays in eval mode inside a model put in training mode
    tok = enc.tokenize(["a photo of a cat", "DOG", "", "cat " * 20])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert ids.shape == mask.shape == (4, 10) and ids.dtype == mask.dtype == torch.long
    assert ids[0].tolist() == [bos, vocab["a</w>"], vocab["photo</w>"], vocab["of</w>"], vocab["a</w>"],
                               vocab["cat</w>"], eos] + [eos] * 3
    assert ids[1, :3].tolist() == [bos, vocab["dog</w>"], eos]
    assert ids[2].tolist() == [bos, eos] + [eos] * 8 and mask[2].tolist() == [1, 1] + [0] * 8  # null caption
    assert ids[3].tolist() == [bos] + [vocab["cat</w>"]] * 8 + [eos] and mask[3].all()  # truncated
    out = enc(ids, mask)
    assert out.shape == (4, 10, 32) and not out.requires_grad
    with torch.no_grad():
        expected = ref(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # causal attention: the caption's tokens do not depend on the padding after them
    with torch.no_grad():
        masked = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[mask.bool()], masked[mask.bool()], rtol=0, atol=1e-5)
    assert enc.config() == dict(kind="clip", spec=f"clip:{tmp_path / 'clip'}", max_length=10, width=32)
    re_enc = rebuild_text_encoder(json.loads(json.dumps(enc.config())), enc.state_dict())
    torch.testing.assert_close(re_enc(ids, mask), out, rtol=0, atol=0)


def test_bert_matches_transformers_and_is_trainable(tmp_path):
    ref, vocab = make_tiny_bert(tmp_path / "bert")
    enc = build_text_encoder(f"bert:{tmp_path / 'bert'}", max_length=10).eval()
    assert enc.trainable and not enc.is_frozen and enc.width == 32
    tok = enc.tokenize(["A photo of cats", "zebra", "", "dog " * 20])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    v = vocab
    assert ids.shape == (4, 10) and ids.dtype == mask.dtype == torch.long
    assert ids[0].tolist() == [v["[CLS]"], v["a"], v["photo"], v["of"], v["cat"], v["##s"], v["[SEP]"]] + [v["[PAD]"]] * 3
    assert ids[1, :3].tolist() == [v["[CLS]"], v["[UNK]"], v["[SEP]"]]
    assert ids[2].tolist() == [v["[CLS]"], v["[SEP]"]] + [v["[PAD]"]] * 8 and mask[2].sum() == 2  # null caption
    assert ids[3].tolist() == [v["[CLS]"]] + [v["dog"]] * 8 + [v["[SEP]"]] and mask[3].all()
    assert mask.tolist()[0] == [1] * 7 + [0] * 3
    out = enc(ids, mask)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # trained jointly: every parameter gets a gradient (no unused pooler to upset DDP)
    enc.train()
    enc(ids, mask).square().mean().backward()
    assert all(p.requires_grad and p.grad is not None for p in enc.parameters())
    re_enc = rebuild_text_encoder(enc.config(), enc.state_dict()).eval()
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(re_enc(ids, mask), enc(ids, mask), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# CEP on tokens
# ---------------------------------------------------------------------------------------------

def cep_inputs(n=400, length=20, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    keep_rows = torch.rand(n, generator=g) > 0.1
    return torch.randn(n, length, d, generator=g), mask, keep_rows


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_cep_on_tokens_statistics_and_zeros(kind, gamma):
    emb, mask, keep_rows = cep_inputs()
    d = emb.shape[-1]
    delta = cep_on_tokens(emb, mask, gamma, kind, torch.Generator().manual_seed(1), keep_rows=keep_rows)
    assert delta.shape == emb.shape and delta.dtype == emb.dtype
    live = mask.bool() & keep_rows[:, None]
    assert delta[~live].eq(0).all()          # padding and dropped (null-caption) rows untouched
    vals = delta[live].double().ravel()
    assert vals.numel() > 100_000 and (vals != 0).all()
    a = gamma / math.sqrt(d)
    if kind == "uniform":
        assert vals.abs().max() <= a * (1 + 1e-6) and vals.abs().max() > a * (1 - 1e-3)
        assert abs(vals.std().item() / (a / math.sqrt(3)) - 1) < 0.01
    else:
        assert abs(vals.std().item() / a - 1) < 0.01  # relative s.e. ~ 0.2 %
        assert vals.abs().max() > 3 * a
    assert abs(vals.mean().item()) < 5 * a / math.sqrt(vals.numel())
    # the draws are models.cep.cep_noise's, in (row, token) order
    ref = cep_noise(emb.shape[0] * emb.shape[1], d, gamma, kind, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(delta, ref.view_as(emb) * live[..., None], rtol=0, atol=0)


def test_cep_on_tokens_gamma_zero_and_all_rows():
    emb, mask, _ = cep_inputs(n=8)
    assert cep_on_tokens(emb, mask, 0.0, "uniform", torch.Generator().manual_seed(0)).eq(0).all()
    delta = cep_on_tokens(emb.bfloat16(), mask, 1.0, "gaussian", torch.Generator().manual_seed(0))
    assert delta.dtype == torch.bfloat16 and delta[~mask.bool()].eq(0).all() and delta[mask.bool()].ne(0).all()
    with pytest.raises(ValueError):
        cep_on_tokens(emb, mask, 1.0, "laplace", torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["gpt2", "t5:t5-small", "", "scratch:some/folder"])
def test_unknown_kind(spec):
    with pytest.raises(ValueError, match="text encoder"):
        build_text_encoder(spec, captions=CAPTIONS)


def test_scratch_needs_captions():
    with pytest.raises(ValueError, match="captions"):
        build_text_encoder("scratch")


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_missing_or_bad_folder(tmp_path, kind):
    with pytest.raises(ValueError, match="no such folder"):
        build_text_encoder(f"{kind}:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="no such folder"):
        build_text_encoder(f"{kind}:./missing-{kind}-folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"cannot load the {kind} text encoder"):
        build_text_encoder(f"{kind}:{tmp_path / 'empty'}")


def test_hub_id_offline(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    monkeypatch.setattr("transformers.utils.hub._is_offline_mode", True, raising=False)  # transformers 4.x
    with pytest.raises(ValueError, match="cannot load the bert text encoder 'no-such-owner/no-such-model'") as err:
        build_text_encoder("bert:no-such-owner/no-such-model")
    assert "\n" not in str(err.value)


def test_max_length_beyond_positions(tmp_path):
    make_tiny_clip(tmp_path / "clip")
    with pytest.raises(ValueError, match="max_length 77 exceeds the 16 positions"):
        build_text_encoder(f"clip:{tmp_path / 'clip'}")
