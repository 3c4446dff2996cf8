"""
Text encoders that turn captions into the token sequence a text-conditional U-Net cross-attends to
(models/unet.py, `context` (N, L, width)), and CEP on those tokens.

The paper's CC3M model (Chen et al. 2024) conditions an LDM U-Net on captions through
`bert-base-uncased`, trained jointly with the U-Net. `build_text_encoder(spec)` gives one of:
  - 'scratch' (the offline default): a small pre-LN transformer encoder (width 128, 4 layers,
    4 heads, learned positions) trained from scratch with the diffusion model, as LDM's text-to-image
    model did with its BERT-tokenised transformer (Rombach et al. 2022). Its tokenizer is word-level,
    built from the training captions; the vocabulary is part of `config()`, so a checkpoint rebuilds
    the encoder without the captions (`rebuild_text_encoder`).
  - 'bert:<folder|hub id>' (default bert-base-uncased, Devlin et al. 2019): trainable, as in the
    paper. Output: last_hidden_state, with the padding masked out of BERT's attention.
  - 'clip:<folder|hub id>' (default openai/clip-vit-large-patch14, Stable Diffusion v1's; Radford et
    al. 2021; or a diffusers pipeline folder, its tokenizer/ and text_encoder/): frozen, so its
    embeddings can be extracted once (`is_frozen`). Output: last_hidden_state,
    computed as Stable Diffusion's FrozenCLIPEmbedder does, from the ids alone: CLIP's attention is
    causal, so padding after the caption cannot change the caption's tokens, and the padding tokens'
    outputs are those the released U-Nets were trained on.

Every encoder has the same interface: `tokenize(list of str) -> dict(input_ids, attention_mask)`, both
(N, max_length) LongTensors (padded, truncated, the end token kept); `encoder(input_ids,
attention_mask) -> (N, L, width)`; attributes `width` (= d for CEP), `trainable`, `is_frozen`,
`config()` (a plain dict of str / int / list, safe for JSON and `torch.load(weights_only=True)`).

Null condition for classifier-free guidance: the empty caption "". It always tokenizes to the start
and end tokens followed by padding: [BOS] [EOS] [PAD]... (scratch), [CLS] [SEP] [PAD]... (BERT),
<|startoftext|> <|endoftext|> <|endoftext|>... (CLIP, whose pad token is its end token), a fixed,
valid sequence whose embedding the encoder learns (scratch, BERT) or fixes (CLIP).

CEP for text (`cep_on_tokens`): δ is added to every token embedding of the caption, d = width; the
padding and the rows dropped to the null caption get δ = 0 (see models/cep.py).
"""
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cep import cep_noise

TEXT_KINDS = ("scratch", "bert", "clip")
DEFAULT_HUB_IDS = {"bert": "bert-base-uncased", "clip": "openai/clip-vit-large-patch14"}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3 of the scratch tokenizer
PAD, UNK, BOS, EOS = range(len(SPECIAL_TOKENS))


# ---------------------------------------------------------------------------------------------
# scratch: word-level tokenizer + small transformer encoder
# ---------------------------------------------------------------------------------------------

def split_words(text):
    """Lower-case, split on everything that is not a letter or a digit."""
    return re.findall(r"[^\W_]+", text.lower())


class WordTokenizer:
    """Word-level tokenizer: ids 0..3 are the special tokens, then the words in sorted order."""

    def __init__(self, words, max_length):
        if max_length < 2:
            raise ValueError("max_length must leave room for the start and end tokens (>= 2)")
        self.words = list(words)
        self.max_length = max_length
        self.ids = {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(self.words)}

    @classmethod
    def from_captions(cls, captions, max_length):
        return cls(sorted({w for c in captions for w in split_words(c)}), max_length)

    @property
    def vocab_size(self):
        return len(SPECIAL_TOKENS) + len(self.words)

    def __call__(self, texts):
        L = self.max_length
        input_ids = torch.full((len(texts), L), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [BOS] + [self.ids.get(w, UNK) for w in split_words(text)][:L - 2] + [EOS]
            input_ids[row, :len(ids)] = torch.tensor(ids)
        return dict(input_ids=input_ids, attention_mask=(input_ids != PAD).long())


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_mask):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        # key-padding mask (B, 1, 1, T), True = attend: no query looks at padding
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class EncoderBlock(nn.Module):
    """Pre-LN transformer block (GPT-2 / ViT ordering): x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, key_mask):
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class ScratchTextEncoder(nn.Module):
    """Small transformer encoder trained jointly with the diffusion model (the offline default)."""
    kind = "scratch"
    trainable = True

    def __init__(self, words, max_length=77, width=128, depth=4, num_heads=4):
        super().__init__()
        self.tokenizer = WordTokenizer(words, max_length)
        self.max_length, self.width, self.depth, self.num_heads = max_length, width, depth, num_heads
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length, width))  # learned positions
        self.blocks = nn.ModuleList([EncoderBlock(width, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)  # final LayerNorm: pre-LN blocks leave the residual unnormalised
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(m):  # GPT-2's initialisation
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    @property
    def is_frozen(self):
        return not self.trainable

    def tokenize(self, texts):
        return self.tokenizer(list(texts))

    def forward(self, input_ids, attention_mask):
        x = self.token_embedding(input_ids) + self.pos_embed[:, :input_ids.shape[1]]
        key_mask = attention_mask.bool()
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)

    def config(self):
        return dict(kind=self.kind, spec=self.kind, max_length=self.max_length, width=self.width,
                    depth=self.depth, num_heads=self.num_heads, vocab=list(self.tokenizer.words))


# ---------------------------------------------------------------------------------------------
# BERT and CLIP through transformers
# ---------------------------------------------------------------------------------------------

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # 'name' or 'owner/name'


def locate(name, kind):
    """A local folder, or a hub id left to transformers; a path that does not exist is an error."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if not HUB_ID.match(name) or name.startswith(".") or os.path.exists(path):
        raise ValueError(f"{kind} text encoder: no such folder: {name}")
    return name


class HFTextEncoder(nn.Module):
    """A transformers text model and its tokenizer: BERT (trainable) or CLIP's text tower (frozen)."""

    def __init__(self, kind, name, max_length=77):
        super().__init__()
        import transformers  # only needed for these two kinds
        self.kind, self.name, self.max_length = kind, name, max_length
        where = locate(name, kind)
        try:
            if kind == "bert":
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(where)
                # no pooler: it is unused here and would leave parameters without gradients (DDP)
                self.model = transformers.BertModel.from_pretrained(where, add_pooling_layer=False)
            else:  # a diffusers pipeline folder (Stable Diffusion) keeps them in tokenizer/ and text_encoder/
                pipeline = os.path.isdir(os.path.join(where, "text_encoder")) and os.path.isdir(os.path.join(where, "tokenizer"))
                self.tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(where, "tokenizer") if pipeline else where)
                self.model = transformers.CLIPTextModel.from_pretrained(os.path.join(where, "text_encoder") if pipeline else where)
        except Exception as err:  # OSError offline / missing files, ValueError for a malformed folder
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot load the {kind} text encoder '{name}': {reason} (offline, pass a folder "
                             f"written by save_pretrained, or set HF_HUB_OFFLINE=1 to fail fast)") from err
        self.model.float()
        limit = self.model.config.max_position_embeddings
        if max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds the {limit} positions of '{name}'")
        self.width = self.model.config.hidden_size
        self.trainable = kind == "bert"  # the paper trains BERT jointly; CLIP stays frozen (as in SD)
        if not self.trainable:
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def is_frozen(self):
        return not self.trainable

    def train(self, mode=True):
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # a frozen encoder never switches to training behaviour
        return self

    def tokenize(self, texts):
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return dict(input_ids=enc["input_ids"].long(), attention_mask=enc["attention_mask"].long())

    def forward(self, input_ids, attention_mask):
        if self.trainable:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        with torch.no_grad():  # frozen CLIP, run on the ids alone (see the header)
            return self.model(input_ids=input_ids).last_hidden_state

    def config(self):
        return dict(kind=self.kind, spec=f"{self.kind}:{self.name}", max_length=self.max_length, width=self.width)


# ---------------------------------------------------------------------------------------------
# LDMBert: the text encoder of LDM's text-to-image model (diffusers' LDMTextToImagePipeline "bert")
# ---------------------------------------------------------------------------------------------

class LDMBertLayer(nn.Module):
    """Pre-LN block: x + out_proj(attention(LN(x))) with bias-free q/k/v of `heads` x `head_dim`
    (which need not equal the width), then x + fc2(GELU(fc1(LN(x)))). Parameter names as diffusers'."""

    def __init__(self, width, heads, head_dim, ffn_dim):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.self_attn_layer_norm, self.final_layer_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.ModuleDict({n: nn.Linear(width, heads * head_dim, bias=False) for n in ("q_proj", "k_proj", "v_proj")})
        self.self_attn["out_proj"] = nn.Linear(heads * head_dim, width)
        self.fc1, self.fc2 = nn.Linear(width, ffn_dim), nn.Linear(ffn_dim, width)

    def forward(self, x):
        N, L, _ = x.shape
        h = self.self_attn_layer_norm(x)
        q, k, v = (self.self_attn[n](h).view(N, L, self.heads, self.head_dim).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, L, -1)
        x = x + self.self_attn["out_proj"](h)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class LDMBert(nn.Module):
    """LDMBert (Rombach et al. 2022's BERT-tokenised transformer, diffusers' LDMBertModel): token +
    learned position embeddings, pre-LN layers, a final LayerNorm; the output is the last hidden state.
    As the pipeline runs it, it sees the ids alone: every token, padding included, attends to all."""

    def __init__(self, vocab_size, max_position_embeddings, d_model, encoder_layers, encoder_attention_heads, head_dim,
                 encoder_ffn_dim):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.embed_positions = nn.Embedding(max_position_embeddings, d_model)
        self.layers = nn.ModuleList([LDMBertLayer(d_model, encoder_attention_heads, head_dim, encoder_ffn_dim)
                                     for _ in range(encoder_layers)])
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids) + self.embed_positions(torch.arange(input_ids.shape[1], device=input_ids.device))
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class IdsOnly(nn.Module):
    """A transformers text model (BertModel, CLIPTextModel) run as LDMTextToImagePipeline runs its
    `bert`: `bert(input_ids)[0]`, no attention mask (padding attends and is attended to), the last
    hidden state."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids).last_hidden_state


class LDMBertEncoder(nn.Module):
    """A frozen pipeline text encoder (LDMBert, or a BertModel / CLIPTextModel in IdsOnly) and its
    tokenizer (a folder; transformers' class `tokenizer_class`), in this file's encoder interface. The
    pipeline pads every caption to 77 tokens and passes no attention mask: the mask is ignored."""
    trainable, is_frozen = False, True

    def __init__(self, bert, tokenizer_folder, max_length=77, tokenizer_class="BertTokenizer"):
        super().__init__()
        import transformers
        self.model, self.max_length, self.folder = bert.eval().requires_grad_(False), max_length, tokenizer_folder
        wrapped = isinstance(bert, IdsOnly)
        self.kind = ("clip-pipeline" if "CLIP" in type(bert.bert).__name__ else "bert-pipeline") if wrapped else "ldmbert"
        self.width = bert.bert.config.hidden_size if wrapped else bert.layer_norm.normalized_shape[0]
        self.tokenizer = getattr(transformers, tokenizer_class).from_pretrained(tokenizer_folder)

    def train(self, mode=True):
        super().train(mode)
        self.model.eval()
        return self

    tokenize = HFTextEncoder.tokenize

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids)

    def config(self):
        return dict(kind=self.kind, spec=f"{self.kind}:{self.folder}", max_length=self.max_length, width=self.width)


# ---------------------------------------------------------------------------------------------
# building, rebuilding, CEP
# ---------------------------------------------------------------------------------------------

def build_text_encoder(spec, captions=None, max_length=77):
    """spec: 'scratch' (needs the training captions for its vocabulary), 'bert[:folder|hub id]' or
    'clip[:folder|hub id]'. Raises ValueError with a one-line message on any bad spec."""
    kind, _, name = spec.partition(":")
    if kind not in TEXT_KINDS:
        raise ValueError(f"unknown text encoder '{spec}'; choose one of: scratch, bert[:DIR|HUB_ID], clip[:DIR|HUB_ID]")
    if kind == "scratch":
        if name:
            raise ValueError(f"the scratch text encoder takes no folder or hub id (got '{spec}')")
        if captions is None:
            raise ValueError("the scratch text encoder needs the training captions to build its vocabulary")
        return ScratchTextEncoder(WordTokenizer.from_captions(captions, max_length).words, max_length)
    return HFTextEncoder(kind, name or DEFAULT_HUB_IDS[kind], max_length)


def rebuild_text_encoder(config, state_dict=None):
    """The encoder that `config()` describes, with `state_dict` loaded when given. Scratch needs
    nothing else; BERT and CLIP need their folder / hub id again (tokenizer and architecture)."""
    if config.get("kind") == "scratch":
        enc = ScratchTextEncoder(config["vocab"], config["max_length"], config["width"], config["depth"],
                                 config["num_heads"])
    else:
        enc = build_text_encoder(config["spec"], max_length=config["max_length"])
    if state_dict is not None:
        enc.load_state_dict(state_dict)
    return enc


def cep_on_tokens(embeddings, attention_mask, gamma, kind, generator=None, keep_rows=None):
    """CEP δ for text tokens (Chen et al. 2024): one fresh draw per token of every caption,
    δ ~ U(-γ/√d, γ/√d) or N(0, (γ/√d)²) with d = embeddings.shape[-1], from models.cep.cep_noise.
    Padding positions (attention_mask 0) get δ = 0, and so do rows with keep_rows False: the
    caller marks the rows dropped to the null caption "" there, which are never perturbed.
    Returns δ, shaped and typed like `embeddings`; the caller adds it (U-Net `cond_noise=δ`) at
    training only. Draws are in row-major (row, token) order from `generator`."""
    N, L, d = embeddings.shape
    delta = cep_noise(N * L, d, gamma, kind, generator=generator, device=embeddings.device).view(N, L, d)
    keep = attention_mask.to(embeddings.device).bool()
    if keep_rows is not None:
        keep = keep & keep_rows.to(embeddings.device).bool()[:, None]
    return (delta * keep[..., None]).to(embeddings.dtype)


class TextConditioned(nn.Module):
    """A denoiser (DiT or U-Net) conditioned on captions through a text encoder that is trained
    jointly (scratch, BERT: as the paper's CC3M LDM) or frozen (CLIP). One module, so DDP, EMA and
    checkpoints cover both. forward(x, t, input_ids, attention_mask, cond_noise=None): cond_noise is
    the token-level CEP δ (cep_on_tokens), added to the encoder output (d = its width)."""

    def __init__(self, denoiser, text_encoder):
        super().__init__()
        self.denoiser, self.text_encoder = denoiser, text_encoder
        for name in ("in_channels", "out_channels", "input_size", "learn_sigma"):
            setattr(self, name, getattr(denoiser, name))
        self.num_classes, self.cond_dim = 0, text_encoder.width
        self.takes_mask = "context_mask" in denoiser.forward.__code__.co_varnames

    def tokenize(self, captions):
        return self.text_encoder.tokenize(list(captions))

    def denoiser_inputs(self, input_ids, attention_mask, cond_noise=None, context=None):
        """The denoiser's condition keywords. context: pre-extracted encoder output (a frozen
        encoder, FrozenTextCache); else computed."""
        if context is None:
            context = self.text_encoder(input_ids, attention_mask)
        if cond_noise is not None:
            context = context + cond_noise.to(context.dtype)  # CEP on every caption token
        return {"context": context, **({"context_mask": attention_mask} if self.takes_mask else {})}

    def forward(self, x, t, input_ids, attention_mask, cond_noise=None, context=None, residuals=None, guidance=None):
        inputs = self.denoiser_inputs(input_ids, attention_mask, cond_noise, context)
        extra = {**({"residuals": residuals} if residuals else {}), **({"guidance": guidance} if guidance is not None else {})}
        return self.denoiser(x, t, **inputs, **extra)

    def flops_per_forward(self):
        return self.denoiser.flops_per_forward()  # the text encoder's cost is not counted


class FrozenTextCache:
    """Outputs of a frozen text encoder (CLIP), extracted once for every distinct caption string of
    the training set (and the empty caption) into <path>.npy (float16) + <path>.json, then looked up
    by string, so training never runs the encoder. Corrupted captions are other strings of the same
    set (swaps) or extra strings (rewrites): pass all of them."""

    def __init__(self, encoder, captions, path, batch_size=256):
        import json
        import numpy as np
        self.strings = sorted(set(captions) | {""})
        meta = {"encoder": encoder.config(), "strings": self.strings}
        if os.path.exists(path + ".json") and os.path.exists(path + ".npy"):
            with open(path + ".json") as f:
                if json.load(f) != meta:
                    raise ValueError(f"{path}.json holds embeddings of other captions or another encoder")
        else:
            param = next(encoder.parameters())
            chunks = []
            with torch.no_grad():
                for start in range(0, len(self.strings), batch_size):
                    tok = encoder.tokenize(self.strings[start: start + batch_size])
                    chunks.append(encoder(tok["input_ids"].to(param.device), tok["attention_mask"].to(param.device)).half().cpu().numpy())
            tmp = path + ".tmp.npy"
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            np.save(tmp, np.concatenate(chunks))
            os.replace(tmp, path + ".npy")
            with open(path + ".json.tmp", "w") as f:
                json.dump(meta, f)
            os.replace(path + ".json.tmp", path + ".json")
        self.embeddings = np.load(path + ".npy", mmap_mode="r")
        self.row = {s: i for i, s in enumerate(self.strings)}

    def lookup(self, captions, device):
        import numpy as np
        rows = np.asarray([self.row[c] for c in captions])
        return torch.from_numpy(np.ascontiguousarray(self.embeddings[rows])).float().to(device)


def frozen_text_cache(encoder, strings, path, master=True, world=1):
    """A frozen text encoder (CLIP) runs once per distinct caption: rank 0 extracts into `path`, then
    every rank maps it (train.py)."""
    if master:
        FrozenTextCache(encoder, strings, path)
    if world > 1:
        torch.distributed.barrier()
    return FrozenTextCache(encoder, strings, path)
