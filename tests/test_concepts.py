"""ConceptAttention: generations bit-identical with the reader on; its maps equal a reference that appends
the concept tokens to the prompt's text and masks attention (concepts see image and concepts; image and
prompt never see concepts), run through each block's own forward with a float64 processor written here."""

import pytest
import torch

from dit_probe import get_adapter
from dit_probe.attention.concepts import concept_maps
from dit_probe.registry import load_pipeline

from .conftest import generate

JOINT = ["tiny-sd3", "tiny-sd3.5", "tiny-flux"]
CONCEPTS = ["car", "red", "sky"]


def _pipe(pipes, name):
    return load_pipeline(name) if name.startswith("toy") else pipes(name)


@pytest.mark.parametrize("name", JOINT + ["toy-mmdit"])
def test_concept_maps_leave_the_generation_bit_identical(pipes, name):
    pipe = _pipe(pipes, name)
    prompts = ["a red car on a blue background"]
    kw = {} if name.startswith("tiny") else {"max_sequence_length": 0}  # toy-mmdit has no T5
    plain = generate(pipe, prompts, **kw) if name.startswith("tiny") else pipe(prompts, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    with concept_maps(pipe, CONCEPTS) as maps:
        again = generate(pipe, prompts, **kw) if name.startswith("tiny") else pipe(prompts, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(plain, again)
    t = maps.tensor()
    assert t.shape[:4] == (3, len(maps.layers), 1, len(CONCEPTS))
    assert torch.allclose(t.sum(3), torch.ones_like(t.sum(3)), atol=1e-5)  # softmax over the concepts
    assert maps.tensor("probability").sum(3).max() <= 1 + 1e-5


class _MaskedReference:
    """SD3's joint attention in float64 with an explicit mask over [image | prompt | concepts]."""

    def __init__(self, n_concepts, store, name):
        self.n, self.store, self.name = n_concepts, store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rows, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x, norm=None):
            x = x.view(rows, -1, heads, x.shape[-1] // heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        q = torch.cat([split(attn.to_q(hidden_states), attn.norm_q),
                       split(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], 2).double()
        k = torch.cat([split(attn.to_k(hidden_states), attn.norm_k),
                       split(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], 2).double()
        v = torch.cat([split(attn.to_v(hidden_states)), split(attn.add_v_proj(encoder_hidden_states))], 2).double()
        total = q.shape[2]
        c0 = total - self.n  # first concept position
        allowed = torch.zeros(total, total, dtype=torch.bool)
        allowed[:c0, :c0] = True  # image and prompt: as without concepts
        allowed[c0:, :n_img] = True  # concepts -> image
        allowed[c0:, c0:] = True  # concepts -> concepts
        logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        o = logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        flat = o.transpose(1, 2).reshape(rows, total, -1)
        self.store[self.name] = dict(
            out=flat[:, :n_img] @ flat[:, c0:].transpose(1, 2),
            prob=(logits[:, :, :n_img, c0:]).softmax(-1).mean(1))
        flat = flat.to(hidden_states.dtype)
        img, txt = flat[:, :n_img], flat[:, n_img:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return attn.to_out[1](attn.to_out[0](img)), txt


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd3.5"])
def test_concept_maps_equal_a_masked_reference(pipes, name):
    pipe = pipes(name)
    ad = get_adapter(pipe)
    cond = ad.encode_prompt(["a red car on a blue background"], do_cfg=False, max_sequence_length=16)
    ad.set_timesteps(4)
    t = pipe.scheduler.timesteps[1]
    z = torch.randn(1, ad.denoiser.config.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))

    def call(embeds):
        return ad.denoiser(hidden_states=z, timestep=t.expand(1), encoder_hidden_states=embeds,
                           pooled_projections=cond.pooled, return_dict=False)[0]

    with torch.no_grad():
        with concept_maps(pipe, CONCEPTS, steps=[1]) as maps:
            got = call(cond.embeds)
        tokens, _ = ad.concept_tokens(CONCEPTS)
        store, old = {}, {}
        for layer, block, _ in ad.concept_blocks():
            old[layer] = block.attn.processor
            block.attn.set_processor(_MaskedReference(len(tokens), store, layer))
        try:
            ref_out = call(torch.cat([cond.embeds, tokens[None]], 1))
        finally:
            for layer, block, _ in ad.concept_blocks():
                block.attn.set_processor(old[layer])
    assert torch.allclose(got, ref_out, atol=1e-4)  # the masked concepts did not reach the image
    assert maps.steps == [1] and len(maps.layers) == len(store)
    for layer in maps.layers:
        for kind, key in (("output", "out"), ("probability", "prob")):
            mine, ref = maps.raw[(kind, 1, layer)].double(), store[layer][key]
            scale = ref.abs().max()
            assert (mine - ref).abs().max() <= 1e-4 * scale + 1e-7, (layer, kind, float((mine - ref).abs().max()), float(scale))


def test_concepts_are_refused_where_there_is_no_joint_attention(pipes):
    with pytest.raises(NotImplementedError, match="joint attention"):
        with concept_maps(pipes("tiny-unet"), ["car"]):
            pass
    with pytest.raises(KeyError, match="unknown joint block"):
        with concept_maps(pipes("tiny-sd3"), ["car"], layers=["block.09.joint"]):
            pass


class _FluxMaskedReference:
    """Flux attention in float64 over [prompt | concepts | image] with RoPE as the block applies it and the
    same mask; double blocks (separate text projections) and single blocks (one sequence)."""

    def __init__(self, n_prompt, n_concepts, store, name):
        self.p, self.n, self.store, self.name = n_prompt, n_concepts, store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        heads = lambda x, norm=None: norm(x.unflatten(-1, (-1, attn.head_dim))) if norm else x.unflatten(-1, (-1, attn.head_dim))  # noqa: E731
        q, k, v = heads(attn.to_q(hidden_states), attn.norm_q), heads(attn.to_k(hidden_states), attn.norm_k), heads(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            q = torch.cat([heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q), q], 1)
            k = torch.cat([heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k), k], 1)
            v = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), v], 1)
        q, k = (apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in (q, k))
        q, k, v = (x.transpose(1, 2).double() for x in (q, k, v))
        total, c0, c1 = q.shape[2], self.p, self.p + self.n
        allowed = torch.ones(total, total, dtype=torch.bool)
        allowed[:, c0:c1] = False  # nothing attends to the concepts ...
        allowed[c0:c1] = False
        allowed[c0:c1, c0:] = True  # ... except the concepts, which see themselves and the image
        logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        o = (logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2).flatten(2)
        self.store[self.name] = dict(out=o[:, c1:] @ o[:, c0:c1].transpose(1, 2),
                                     prob=logits[:, :, c1:, c0:c1].softmax(-1).mean(1))
        o = o.to(hidden_states.dtype)
        if encoder_hidden_states is None:
            return o
        txt, img = o[:, :c1], o[:, c1:]
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(txt)


def test_flux_concept_maps_equal_a_masked_reference(pipes):
    pipe = pipes("tiny-flux")
    ad = get_adapter(pipe)
    cond = ad.encode_prompt(["a red car on a blue background"], max_sequence_length=16)
    ad.set_timesteps(4, latents=torch.zeros(1, 4, 8, 8))
    t = pipe.scheduler.timesteps[1]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, ad.denoiser.config.in_channels, generator=g)  # 4 x 4 packed tokens
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).view(-1, 3)

    def call(embeds, txt_ids):
        return ad.denoiser(hidden_states=z, timestep=(t / 1000).expand(1), guidance=torch.full((1,), 3.5),
                           pooled_projections=cond.pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                           img_ids=img_ids, return_dict=False)[0]

    txt_ids = cond.extra["txt_ids"]
    with torch.no_grad():
        with concept_maps(pipe, CONCEPTS, steps=[1]) as maps:
            got = call(cond.embeds, txt_ids)
        tokens, _ = ad.concept_tokens(CONCEPTS)
        store, old = {}, {}
        for layer, block, _ in ad.concept_blocks():
            old[layer] = block.attn.processor
            block.attn.set_processor(_FluxMaskedReference(cond.embeds.shape[1], len(tokens), store, layer))
        try:
            ref = call(torch.cat([cond.embeds, tokens[None]], 1), torch.cat([txt_ids, torch.zeros(len(tokens), 3)]))
        finally:
            for layer, block, _ in ad.concept_blocks():
                block.attn.set_processor(old[layer])
    assert torch.allclose(got, ref, atol=1e-4)
    assert maps.layers == [n for n, _, _ in ad.concept_blocks()] and any(n.startswith("single") for n in maps.layers)
    for layer in maps.layers:
        for kind, key in (("output", "out"), ("probability", "prob")):
            mine, want = maps.raw[(kind, 1, layer)].double(), store[layer][key]
            assert (mine - want).abs().max() <= 1e-4 * want.abs().max() + 1e-7, (layer, kind)


def test_concepts_given_as_embeddings_equal_encoded_words(pipes):
    pipe = pipes("tiny-flux")  # one text stream: one token per concept
    ad = get_adapter(pipe)
    with torch.no_grad():  # as concept_maps encodes them (SDPA picks another kernel when autograd records)
        tokens, owner = ad.concept_tokens(CONCEPTS)
    assert owner == [0, 1, 2]
    runs = []
    for embeddings in (None, tokens):
        with concept_maps(pipe, CONCEPTS, embeddings=embeddings) as cm:
            generate(pipe, ["a red car on a blue background"])
        runs.append(cm.tensor())
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match="embeddings must be"):
        with concept_maps(pipe, CONCEPTS, embeddings=tokens[:2]):
            pass
